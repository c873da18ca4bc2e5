"""Personal data and secrets replaced by typed placeholders: e-mail addresses, phone numbers, IP addresses, payment
card numbers, IBANs, and credentials (API keys, tokens, passwords, private keys).

Every kind is found by a regular expression that only proposes candidates, then checked by what makes it that kind:
payment cards by the Luhn checksum and an issuer's first digit, IBANs by the ISO 13616 registry format and mod-97
checksum (python-stdnum), IP addresses by ``ipaddress``, generic ``password=`` values by their entropy. Candidates
failing the check are left as they are, so version numbers, dates, hashes and numbers in tables survive.

Decisions worth knowing:

- A dotted quad of small numbers (all four <= 31: ``1.2.3.4``, ``4.8.3.1``) is kept: in documents it is far more
  often a version or a section number than a host, and the few hosts it can name (1.1.1.1, 8.8.8.8, 9.9.9.9) are
  public resolvers, not anyone's address. Other valid dotted quads are addresses, unless a version cue comes right
  before them (``version``, ``since``, ``section``, ``==``) or they continue as a longer dotted number
  (``1.2.3.4.5``). Addresses that identify no one are kept too: loopback, this-network (``0.0.0.0/8``), the
  documentation ranges of RFC 5737 / RFC 3849, multicast and reserved space (which covers netmasks such as
  ``255.255.255.0``), and by default private networks (RFC 1918, link-local, shared CGN space, IPv6 unique-local).
- Phone numbers: international ``+CC`` forms (8 to 15 digits with separators, 11 to 15 without: ``+32768000`` is as
  likely a signed number); North American ``(212) 555-0147`` / ``212-555-0147`` / ``212.555.0147`` (area code and
  exchange starting with 2-9, as the numbering plan has them); European national forms with a trunk ``0`` and one
  kind of separator (``030 1234567``, ``06 12 34 56 78``, ``(0)20 7946 0958``) of 10 or 11 digits. A bare run of
  digits without a leading ``+`` is never a phone number.
- Payment cards: 13 to 19 digits starting with 2 to 6 (ISO/IEC 7812 issuers of payment cards), Luhn-valid, unspaced
  or written 4-4-4-4(-3) / 4-6-5 with one kind of separator.
- Generic credentials: a ``password``/``passwd``/``pwd``/``secret``/``token``/``api_key``/``access_key`` key (as part
  of a longer name too: ``db_password``, ``AWS_SECRET_ACCESS_KEY``) assigned with ``=``, ``:`` or ``:=`` a literal
  value (quoted, or a bare word that is not a name such as ``self.token`` or a call such as ``getpass()``), not a
  placeholder (``<key>``, ``${TOKEN}``, ``xxxx``), not a path or URL, of high enough entropy. Only the value is
  replaced: ``password = "<SECRET>"``.

Speed: a document is first screened with cheap tests (a character, a short literal, one pass for "ten digits or a
dotted quad"); the expressions of a kind only run on documents, and from the offset, where the screen found
something.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import regex

from ....errors import DataError
from ..base import Doc, DocumentStep, StepStats, register

KINDS = ("email", "phone", "ip_address", "credit_card", "iban", "secret")
"""Every kind this step knows."""

_KEEP_IPS = ("0.0.0.0/8", "127.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/3",
             "::/128", "::1/128", "2001:db8::/32", "ff00::/8")
_PRIVATE_IPS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10",
                "fc00::/7", "fe80::/10")


@dataclass(frozen=True)
class PiiConfig:
    """What to scrub and what to put in its place."""

    kinds: tuple[str, ...] = KINDS
    """Kinds to replace: any of email, phone, ip_address, credit_card, iban, secret."""
    placeholder: str = "<{KIND}>"
    """What replaces a match: ``{kind}`` is the kind's name (``ip_address``), ``{KIND}`` the same in capitals."""
    keep_private_ips: bool = True
    """Keep private-network addresses (RFC 1918, link-local, CGN, IPv6 unique-local): they identify no one."""
    keep_ip_ranges: tuple[str, ...] = _KEEP_IPS
    """Networks (CIDR) whose addresses are kept: loopback, this-network, documentation, multicast and reserved."""
    version_like_max: int | None = 31
    """A dotted quad whose four numbers are all <= this (``1.2.3.4``, ``4.8.3.1``) is kept as a version or section
    number (None: no such rule)."""
    min_secret_entropy: float = 2.5
    """Smallest Shannon entropy (bits per character) of a generic ``password=``/``token=`` value to count as secret."""

    def check(self) -> None:
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown PII kind(s) {', '.join(unknown)} (known: {', '.join(KINDS)})")
        try:
            self.placeholder.format(kind="email", KIND="EMAIL")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"placeholder {self.placeholder!r} may only use {{kind}} and {{KIND}}: {e}") from None
        for net in self.keep_ip_ranges:
            try:
                ipaddress.ip_network(net)
            except ValueError as e:
                raise ValueError(f"keep_ip_ranges: {e}") from None


# ------------------------------------------------------------------------------------------------------- secrets
# PEM private keys (PKCS#1/#8, EC, OpenSSH, encrypted, PGP blocks): the whole block, or a header and its base64 lines
# when the END line is missing (a truncated paste).
_PRIVATE_KEY = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?)-----.*?-----END \1-----"
    r"|-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:\r?\n[\w-]+: [^\n]*)*(?:\r?\n(?=\r?\n))?"
    r"(?:\r?\n[A-Za-z0-9+/=]{16,})*",
    re.DOTALL)
# Tokens whose shape alone says what they are (the providers' documented prefixes), screened by those prefixes: one
# expression per leading literal, as an expression starting with a literal is searched far faster than alternatives.
_TOKEN_HINTS = tuple(re.compile(p) for p in (r"A(?:KIA|SIA|BIA|CCA|Iza)", r"gh(?:[pousr]_|ithub_pat_)",
                                             r"xox[baprs]-", r"k_(?:live|test)_", r"eyJ"))
_TOKEN = re.compile(
    r"(?<![\w-])(?:"
    r"(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"  # GitHub tokens
    r"|xox[baprs]-[A-Za-z0-9-]{10,250}"  # Slack
    r"|AIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|[sr]k_(?:live|test)_[0-9A-Za-z]{16,247}"  # Stripe secret / restricted key
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT: {"alg".. . {"sub".. . signature
    r")(?![\w-])")
# key = value, key: value, key := value, "key": "value" (JSON, YAML, shell, Python, ini). The scan runs from each
# '=' and each ':' (one expression each, starting with that literal) and looks back for the key with a
# variable-width look-behind (``regex``).
_KEY = r"(?<=(?i:passw(?:or)?d|\bpwd|secret|token|api[_-]?key|access[_-]?key)[\w-]{0,40}[\"']?[ \t]*(?::=|=|:))"
_VALUE = r"[ \t]*(?:(?P<q>[\"'`])(?P<quoted>[^\"'`\s]{8,200})(?P=q)|(?P<bare>[^\s\"'`,;()\[\]{}<>]{8,200}))"
_ASSIGNMENTS = (regex.compile(r"=(?<!==)(?!=)" + _KEY + _VALUE), regex.compile(r":(?![:=])" + _KEY + _VALUE))
_PLACEHOLDER_VALUE = re.compile(
    r"(?i)^(?:[x*.#_-]+|<[^>]*>|\$\{?[\w.:-]+\}?|%\(?\w*\)?s|\{\{.*\}\}|\{[\w.]*\}|none|null|nil|true|false|undefined"
    r"|(?:your|my|the|some)[_-]?\w*|\w*(?:here|example|placeholder|changeme|redacted)\w*)$")
_PATH_OR_URL = re.compile(r"^(?:/|\.{1,2}/|~/|[A-Za-z]:\\|[a-z][a-z0-9+.-]*://)")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z_.]*$")  # self.token, os.environ, settings.SECRET_KEY, PASSWORD


def _entropy(s: str) -> float:
    """Shannon entropy of the characters of ``s``, in bits per character."""
    n = len(s)
    return -sum(k / n * math.log2(k / n) for k in Counter(s).values())


# ------------------------------------------------------------------------------------------------------- e-mail
# Matched from the local part's start, found by walking back from each '@'. Not systemd unit instances
# (user@1000.service, getty@tty1.service): their suffixes are no top-level domains.
_EMAIL = re.compile(
    r"(?<![\w.%+-])[\w.%+-]{1,64}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"(?!(?:service|socket|target|timer|mount|automount|slice|scope|path|device|swap)(?![\w-]))"
    r"[A-Za-z]{2,24}(?![\w-]|\.[A-Za-z0-9])")
_LOCAL_PART = re.compile(r"[\w.%+-]{1,64}\Z")

# ------------------------------------------------------------------------------------------- numbers of all kinds
# Cards, IBANs, North American and national phone numbers all hold ten digits or more (with short separators), an
# IPv4 address a dotted quad: one pass finds where the first such number starts, the kinds' expressions run from there.
_NUMBERS_HINT = re.compile(r"[0-9](?:\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]|(?:[ ./()-]{0,2}[0-9]){9})")
# An IBAN starts with a country code and two check digits, then its BBAN unspaced or in groups of four.
_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z][0-9]{2}(?:(?: [A-Z0-9]{4})+(?: [A-Z0-9]{1,3})?|[A-Z0-9]{11,30})"
                   r"(?![A-Za-z0-9])")
# 13 to 19 digits, unseparated or in groups split by single spaces or dashes.
_CARD = re.compile(r"[0-9](?<![\w.,+-][0-9])(?:[ -]?[0-9]){12,18}(?![\w+]|[.,-][0-9])")
_SEPARATORS = re.compile(r"[ /.-]")
_IPV4 = re.compile(r"[0-9](?<![\w.-][0-9])[0-9]{0,2}\.(?:[0-9]{1,3}\.){2}[0-9]{1,3}(?![\w]|\.[0-9]|-[A-Za-z])")
_VERSION_CUE = re.compile(r"(?i)(?:\bversions?|\bver\.?|\brelease|\brel\.?|\bsince|\bsection|\bv|§|==|>=|<=)\s*$")
_PHONE = re.compile(
    # North American: (NPA) NXX-XXXX, NPA-NXX-XXXX, NPA.NXX.XXXX, optionally after 1-
    r"(?<![\w.+-])(?P<nanp>(?:1[-. ])?(?:\([2-9][0-9]{2}\) ?[2-9][0-9]{2}-|[2-9][0-9]{2}(?P<s>[-.])[2-9][0-9]{2}(?P=s))"
    r"[0-9]{4})(?![\w-]|\.[0-9])"
    # European national: trunk 0 + area code (bracketed or not), then separated groups
    r"|(?<![\w.+/-])(?P<national>(?:\(0\) ?[1-9][0-9]{0,3}|\(0[1-9][0-9]{0,3}\) ?[0-9]{2,8}|0[1-9][0-9]{0,3})"
    r"(?:[ /.-][0-9]{2,8}){0,5})(?![\w/-]|\.[0-9])")

# ------------------------------------------------------------------------------------- international phones, IPv6
_PHONE_INTL = re.compile(r"\+(?<![\w+]\+)[1-9][0-9]{0,14}(?:[ .-]?\([0-9]{1,4}\))?(?:[ .-][0-9]{1,10}){0,6}"
                         r"(?![\w]|[.-][0-9])")
# A run of two colons, or three groups of hex digits between colons: where an IPv6 address may be. The address is
# then matched from the start of the run of hex digits, colons and dots around it.
_IPV6_HINT = re.compile(r":(?::|[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:)")
_IPV6_RUN_START = re.compile(r"[0-9A-Fa-f:.]{1,45}\Z")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:[0-9]{1,3}\.){3}[0-9]{1,3}|[0-9A-Fa-f]{1,4})?"
                   r"(?![\w:]|\.[0-9])")


def _splice(text: str, spans: Iterable[tuple[int, int, str]]) -> str:
    """``text`` with each (start, end) span, in order and not overlapping, replaced by its string."""
    out: list[str] = []
    pos = 0
    for start, end, new in spans:
        out += [text[pos:start], new]
        pos = end
    out.append(text[pos:])
    return "".join(out)


@register
class Pii(DocumentStep):
    """Replace personal data and secrets by typed placeholders (``<EMAIL>``, ``<PHONE>``, ``<IP_ADDRESS>``,
    ``<CREDIT_CARD>``, ``<IBAN>``, ``<SECRET>``), counting each replacement under its kind."""

    name = "pii"
    config_cls = PiiConfig

    def setup(self) -> None:
        try:
            from stdnum import iban, luhn
        except ImportError:
            raise DataError("the pii step needs the package python-stdnum: pip install python-stdnum") from None
        self._iban_valid = lambda s: iban.is_valid(s, check_country=False)
        self._luhn_valid = luhn.is_valid
        c = self.config
        self._kinds = frozenset(c.kinds)
        self._placeholder = {k: c.placeholder.format(kind=k, KIND=k.upper()) for k in KINDS}
        keep = list(c.keep_ip_ranges) + (list(_PRIVATE_IPS) if c.keep_private_ips else [])
        self._keep_nets = [ipaddress.ip_network(n) for n in keep]

    def apply(self, doc: Doc, stats: StepStats) -> Doc:
        # Order matters: a secret may hold an '@' or digits, an e-mail address digits, an international number a
        # North American one, an IBAN a card-like run of digits; what an earlier kind replaced, a later one
        # cannot see.
        text = doc.text
        counts: Counter = Counter()
        kinds = self._kinds
        if "secret" in kinds:
            text = self._secrets(text, counts)
        if "email" in kinds and "@" in text:
            text = self._emails(text, counts)
        if "ip_address" in kinds and ":" in text:
            text = self._ipv6(text, counts)
        if "phone" in kinds and "+" in text:
            text = self._sub(_PHONE_INTL, text, 0, "phone", self._keep_intl_phone, counts)
        hint = _NUMBERS_HINT.search(text)
        if hint is not None:
            text = self._numbers(text, max(0, hint.start() - 34), counts)
        for kind, n in counts.items():
            stats.count(kind, n)
        doc.text = text
        return doc

    def _sub(self, pattern: re.Pattern, text: str, start: int, kind: str, keep: Callable[[re.Match], bool],
             counts: Counter) -> str:
        """Replace the matches of ``pattern`` from ``start`` on that ``keep`` does not keep."""
        spans = [(m.start(), m.end(), self._placeholder[kind]) for m in pattern.finditer(text, start) if not keep(m)]
        if not spans:
            return text
        counts[kind] += len(spans)
        return _splice(text, spans)

    # ------------------------------------------------------------------------------------------------- secrets
    def _secrets(self, text: str, counts: Counter) -> str:
        placeholder = self._placeholder["secret"]
        if "PRIVATE KEY" in text:
            text, n = _PRIVATE_KEY.subn(placeholder, text)
            counts["secret"] += n
        hints = [m.start() for m in (h.search(text) for h in _TOKEN_HINTS) if m is not None]
        if hints:
            spans = [(m.start(), m.end(), placeholder) for m in _TOKEN.finditer(text, max(0, min(hints) - 1))]
            if spans:
                counts["secret"] += len(spans)
                text = _splice(text, spans)
        spans = []
        end = 0
        for m in sorted((m for a in _ASSIGNMENTS for m in a.finditer(text)), key=lambda m: m.start()):
            group = "quoted" if m.group("quoted") is not None else "bare"
            # "password: token=abc..." holds two assignments, the second inside the first's value
            if m.start(group) >= end and self._is_secret_value(m.group(group), quoted=group == "quoted"):
                spans.append((m.start(group), m.end(group), placeholder))
                end = m.end(group)
        if spans:
            counts["secret"] += len(spans)
            text = _splice(text, spans)
        return text

    def _is_secret_value(self, value: str, quoted: bool) -> bool:
        if _PLACEHOLDER_VALUE.match(value) or _PATH_OR_URL.match(value):
            return False
        if not quoted and (_NAME.match(value) or value.endswith(".")):  # code (a name) or the end of a sentence
            return False
        return _entropy(value) >= self.config.min_secret_entropy

    # -------------------------------------------------------------------------------------------------- e-mail
    def _emails(self, text: str, counts: Counter) -> str:
        spans = []
        at = text.find("@")
        while at != -1:
            local = _LOCAL_PART.search(text, max(0, at - 64), at)
            m = _EMAIL.match(text, local.start()) if local else None
            if m is not None and m.end() > at:
                spans.append((m.start(), m.end(), self._placeholder["email"]))
                at = text.find("@", m.end())
            else:
                at = text.find("@", at + 1)
        if spans:
            counts["email"] += len(spans)
            text = _splice(text, spans)
        return text

    # ---------------------------------------------------------------------------------------------------- numbers
    def _numbers(self, text: str, start: int, counts: Counter) -> str:
        """IBANs, payment cards, IPv4 addresses and phone numbers from ``start`` on.

        Every candidate of a kind, replaced or not, hides the candidates of later kinds that overlap it: the digits of
        an IBAN failing its checksum are neither a card nor a phone number, a column of numbers failing the Luhn
        check is no phone number either.
        """
        candidates: list[tuple[int, int, str, bool]] = []  # start, end, kind, replace?
        if "iban" in self._kinds:
            for m in _IBAN.finditer(text, start):
                valid = self._valid_iban(m.group(0))
                candidates.append((m.start(), m.start() + len(valid or m.group(0)), "iban", bool(valid)))
        for kind, pattern, keep in (("credit_card", _CARD, self._keep_card), ("ip_address", _IPV4, self._keep_ipv4),
                                    ("phone", _PHONE, self._keep_phone)):
            if kind in self._kinds:
                candidates += [(m.start(), m.end(), kind, not keep(m)) for m in pattern.finditer(text, start)]
        taken: list[tuple[int, int, str, bool]] = []  # disjoint, sorted by start
        for cand in candidates:
            i = bisect.bisect(taken, cand)
            if (i and taken[i - 1][1] > cand[0]) or (i < len(taken) and taken[i][0] < cand[1]):
                continue
            taken.insert(i, cand)
        spans = [(a, b, self._placeholder[kind]) for a, b, kind, replace in taken if replace]
        if not spans:
            return text
        counts.update(kind for _, _, kind, replace in taken if replace)
        return _splice(text, spans)

    def _valid_iban(self, candidate: str) -> str:
        """The IBAN ``candidate`` starts with, or ''. The spaced form may run into a following word of four capitals:
        trailing groups are dropped until the rest is valid."""
        while len(candidate.replace(" ", "")) >= 15:
            if self._iban_valid(candidate):
                return candidate
            candidate = candidate.rsplit(" ", 1)[0] if " " in candidate else ""
        return ""

    def _keep_card(self, m: re.Match) -> bool:
        s = m.group(0)
        digits = s.replace(" ", "").replace("-", "")
        # ISO/IEC 7812: payment cards start with 2 to 6 (travel, banking, merchandising issuers).
        if digits[0] not in "23456" or not self._luhn_valid(digits):
            return True
        groups = [len(g) for g in _SEPARATORS.split(s)]
        if len(groups) > 1:
            # Written cards use one separator and groups of four (4-4-4-4, 4-4-4-4-3) or 4-6-5 / 4-6-4 (Amex,
            # Diners); other groupings are columns of numbers.
            if len(set(_SEPARATORS.findall(s))) > 1 or groups[0] != 4 or groups[-1] > 6:
                return True
            if any(g not in (4, 6) for g in groups[1:-1]):
                return True
        return False

    # ----------------------------------------------------------------------------------------------- addresses
    def _keep_ip(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(addr in net for net in self._keep_nets if net.version == addr.version)

    def _keep_ipv4(self, m: re.Match) -> bool:
        try:
            addr = ipaddress.IPv4Address(m.group(0))  # octets <= 255, no leading zeros
        except ValueError:
            return True
        if self.config.version_like_max is not None and max(addr.packed) <= self.config.version_like_max:
            return True
        return self._keep_ip(addr) or bool(_VERSION_CUE.search(m.string, max(0, m.start() - 12), m.start()))

    def _ipv6(self, text: str, counts: Counter) -> str:
        spans = []
        end = 0
        for hint in _IPV6_HINT.finditer(text):
            if hint.start() < end:
                continue
            run = _IPV6_RUN_START.search(text, max(end, hint.start() - 45), hint.start())
            m = _IPV6.match(text, run.start() if run else hint.start())
            if m is None or m.end() <= hint.start():
                continue
            end = m.end()
            s = m.group(0)
            if not any(ch.isdigit() for ch in s):  # "add::bead" is a C++ or Perl name, not an address
                continue
            try:
                addr = ipaddress.IPv6Address(s)
            except ValueError:
                continue
            if not self._keep_ip(addr):
                spans.append((m.start(), m.end(), self._placeholder["ip_address"]))
        if spans:
            counts["ip_address"] += len(spans)
            text = _splice(text, spans)
        return text

    # -------------------------------------------------------------------------------------------------- phones
    @staticmethod
    def _keep_intl_phone(m: re.Match) -> bool:
        s = m.group(0)
        digits = sum(ch.isdigit() for ch in s)
        separated = any(not ch.isdigit() for ch in s[1:])
        return not (8 if separated else 11) <= digits <= 15

    @staticmethod
    def _keep_phone(m: re.Match) -> bool:
        if m.group("nanp"):
            return False
        # European national number: 10 or 11 digits (fewer are as often a US ZIP+4 code or a big number written
        # with spaces), split by one kind of separator or after a bracketed area code.
        number = m.group("national")
        digits = sum(ch.isdigit() for ch in number)
        rest = number[number.index(")") + 1:].lstrip() if number.startswith("(") else number
        separators = set(_SEPARATORS.findall(rest))
        return not 10 <= digits <= 11 or len(separators) > 1 or not (separators or number.startswith("("))
