"""The pii step: each kind found and replaced with exact counts, and documents that must come out untouched."""

import pytest

from stemma.data.curate.base import CurateContext, Doc, StepStats
from stemma.data.curate.steps.pii import Pii, PiiConfig


def scrub(text: str, **config) -> tuple[str, dict]:
    step = Pii(PiiConfig(**config), CurateContext(name="t", language="en"))
    step.setup()
    stats = StepStats(step="pii")
    doc = Doc(id="d", text=text, split="train", meta={})
    out = step.apply(doc, stats)
    assert out is doc
    return doc.text, dict(stats.kinds)


def test_emails():
    text, kinds = scrub("Write to jane.doe@example.com or (J.Smith+news@mail.example.co.uk).")
    assert text == "Write to <EMAIL> or (<EMAIL>)."
    assert kinds == {"email": 2}


def test_phone_numbers():
    text, kinds = scrub("Call +49 30 1234567, +1 (212) 555-0147, +33612345678, (212) 555-0147, 212-555-0147, "
                        "212.555.0147, 1-212-555-0147, 030 1234567, 06 12 34 56 78 or (0)20 7946 0958.")
    assert text == ("Call <PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE> "
                    "or <PHONE>.")
    assert kinds == {"phone": 10}


def test_ip_addresses_and_kept_ranges():
    text, kinds = scrub("Server 93.184.216.34 and 2a00:1450:4001:81b::200e; kept: 127.0.0.1, 0.0.0.0, "
                        "192.168.1.1, 10.0.0.1, 192.0.2.7, 255.255.255.0, ::1, fe80::1, 2001:db8::1.")
    assert text == ("Server <IP_ADDRESS> and <IP_ADDRESS>; kept: 127.0.0.1, 0.0.0.0, 192.168.1.1, 10.0.0.1, "
                    "192.0.2.7, 255.255.255.0, ::1, fe80::1, 2001:db8::1.")
    assert kinds == {"ip_address": 2}
    text, kinds = scrub("home 192.168.1.1", keep_private_ips=False)
    assert text == "home <IP_ADDRESS>" and kinds == {"ip_address": 1}


def test_payment_cards_need_luhn():
    text, kinds = scrub("Visa 4111 1111 1111 1111, MC 5555-5555-5555-4444, Amex 378282246310005, "
                        "not 4111 1111 1111 1112 (fails Luhn).")
    assert text == "Visa <CREDIT_CARD>, MC <CREDIT_CARD>, Amex <CREDIT_CARD>, not 4111 1111 1111 1112 (fails Luhn)."
    assert kinds == {"credit_card": 3}


def test_ibans_need_their_checksum():
    text, kinds = scrub("Pay DE89 3704 0044 0532 0130 00 or GB82WEST12345698765432 BIC COBADEFFXXX; "
                        "DE89 3704 0044 0532 0130 01 is wrong.")
    assert text == "Pay <IBAN> or <IBAN> BIC COBADEFFXXX; DE89 3704 0044 0532 0130 01 is wrong."
    assert kinds == {"iban": 2}


def test_tokens_and_keys():
    tokens = ["AKIAIOSFODNN7EXAMPLE", "ghp_1234567890abcdefghijklmnopqrstuvwxyzAB",
              "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz", "xoxb-1234567890-abcdefghijkl",
              "AIzaSyA1234567890abcdefghijklmnopqrstuv", "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
              "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFU"]
    text, kinds = scrub("keys: " + ", ".join(tokens) + ".")
    assert text == "keys: " + ", ".join(["<SECRET>"] * len(tokens)) + "."
    assert kinds == {"secret": len(tokens)}


def test_credential_assignments_replace_only_the_value():
    text, kinds = scrub('password = "Sup3rS3cret!"\n'
                        "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n"
                        '{"api_key": "a8f5f167f44f4964e6c998dee827110c"}\n'
                        "export GITHUB_TOKEN=ab12cd34ef56\n"
                        "password: token=abc123XYZ987qwe\n")
    assert text == ('password = "<SECRET>"\n'
                    "aws_secret_access_key = <SECRET>\n"
                    '{"api_key": "<SECRET>"}\n'
                    "export GITHUB_TOKEN=<SECRET>\n"
                    "password: <SECRET>\n")
    assert kinds == {"secret": 5}


def test_private_key_block():
    text, kinds = scrub("key:\n-----BEGIN RSA PRIVATE KEY-----\n"
                        "MIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6sE2I2yPB\n"
                        "aBDcMHUcnlw7DskWzMb0WDxNTE4bfakeDATA0123456789abcdefABCDEFGH\n"
                        "-----END RSA PRIVATE KEY-----\nafter")
    assert text == "key:\n<SECRET>\nafter"
    assert kinds == {"secret": 1}


MAN_PAGE = """\
ACCESSDB(8)                   Manual pager utils                   ACCESSDB(8)

NAME
       accessdb - dumps the content of a man-db database, see ls(1) and chmod 755 file.

VERSIONS
       version 2.11.2 (2023-01-08, 08.01.2023 at 12:30:45); release 1.2.3.4 and 4.8.3.1. Recap;
       since version 100.200.30.40, OID 1.3.6.1.4.1.2021; netmask 255.255.255.0; ISBN 978-3-16-148410-0.
       sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
       uuid 123e4567-e89b-12d3-a456-426614174000, id 1234567890123, count 1 073 741 824.
       Not a card: 4111 1111 1111 1112. Not an IBAN: DE89 3704 0044 0532 0130 01.
       Columns: 251609 1000 1000 SIGTRAP. ZIP: Boston, MA 02110-1301 USA. Range (-33554432, +33554432).
       std::vector<int> Foo::Bar add::bead user@1000.service

CODE
       @decorator
       def f(password: str):
           password = getpass()
           password = getpass.getpass()
           token = self.token
           secret = "<your-secret>"
           api_key = os.environ["API_KEY"]
           if password == "hunter22xyz": pass
"""


def test_documents_that_must_not_be_touched():
    text, kinds = scrub(MAN_PAGE)
    assert text == MAN_PAGE
    assert kinds == {}


def test_kinds_and_placeholder_config():
    text, kinds = scrub("a@example.org 93.184.216.34", kinds=("ip_address",), placeholder="[{kind}]")
    assert text == "a@example.org [ip_address]"
    assert kinds == {"ip_address": 1}


@pytest.mark.parametrize("bad", [{"kinds": ("email", "ssn")}, {"placeholder": "<{name}>"},
                                 {"keep_ip_ranges": ("10.0.0.0/33",)}])
def test_config_check(bad):
    with pytest.raises(ValueError):
        PiiConfig(**bad).check()
