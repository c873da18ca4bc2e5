"""Words, shingles and MinHash for the corpus steps (near_dedup, decontaminate, poisoning), vectorised with numpy.

Everything here is deterministic across processes and machines: no Python ``hash()`` (salted per process), only
fixed integer arithmetic on the text's code points. A module whose name starts with ``_`` registers no step.

Words are maximal runs of letters, digits and combining marks (Unicode L, N, M) of the lowercased text; everything
else (punctuation, symbols, spaces) separates them. That is the "lowercase, strip punctuation" normalisation of
GPT-3's decontamination (Brown et al. 2020, appendix C) and close to datatrove's simplified word shingles.
Scripts written without spaces (Chinese, Japanese, Thai) make one "word" per run: use character shingles there.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ....errors import DataError

U64 = np.uint64
MAX32 = np.uint64(0xFFFFFFFF)
_P = 0x5851F42D4C957F2D
"""Multiplier of the polynomial string hash (PCG's LCG multiplier)."""
_NGRAM_MUL = np.uint64(0x9E3779B97F4A7C15)
"""Multiplier chaining word hashes into n-gram hashes (the 64-bit golden ratio, as in splitmix64)."""
_CHUNK_CHARS = 1 << 20
"""Code points tokenised at once (whole documents, so a longer document makes a longer chunk): bounds the
temporary arrays, about 45 bytes per code point (45 MB), whatever the shard's size."""


# ------------------------------------------------------------------------------------------------ hashing
def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele, Lea & Flood 2014): a bijection on uint64 whose every output bit depends on
    every input bit, so polynomial hashes (weak in the low bits) become uniform. Returns a new array."""
    z = z ^ (z >> U64(30))
    z *= U64(0xBF58476D1CE4E5B9)
    z ^= z >> U64(27)
    z *= U64(0x94D049BB133111EB)
    z ^= z >> U64(31)
    return z


_POW_CACHED = 1 << 12
_POW: np.ndarray = np.ones(1, dtype=U64)


def _powers(n: int) -> np.ndarray:
    """``P**i`` modulo 2**64 for i < n (at least): a word's i-th code point is weighted by ``P**i``. Words are short,
    so a table of 4096 is kept; a longer run of letters (text without spaces, a long token) gets a table of its own
    that is not kept, so one odd document does not pin a large array for the life of the worker."""
    global _POW
    if n <= len(_POW):
        return _POW
    table = _power_table(_P, max(n, min(2 * len(_POW), _POW_CACHED)))
    if len(table) <= _POW_CACHED:
        _POW = table
    return table


def _power_table(base: int, size: int) -> np.ndarray:
    # Block doubling (powers [k, 2k) are powers [0, k) times base**k): log2(size) vectorised multiplies, where
    # np.cumprod would be one scalar multiply per element.
    out = np.empty(size, dtype=U64)
    out[0] = 1
    k = 1
    while k < size:
        m = min(k, size - k)
        np.multiply(out[:m], U64(pow(base, k, 1 << 64)), out=out[k:k + m])
        k += m
    return out


_WORD_CHAR: np.ndarray | None = None


def word_chars() -> np.ndarray:
    """A bool table over all code points: True for letters, digits and combining marks (\\p{L}, \\p{N}, \\p{M}).

    Built once per process from the `regex` module's Unicode tables (0.2 s), so that tokenising is a numpy lookup
    per code point instead of a regex match object per word."""
    global _WORD_CHAR
    if _WORD_CHAR is None:
        import regex

        # Every code point as one string, decoded from an array: joining 1.1 million one-character strings would
        # pass 100 MB through the heap of every worker.
        every = np.arange(0x110000, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")
        table = np.zeros(0x110000, dtype=bool)
        for m in regex.finditer(r"[\p{L}\p{N}\p{M}]+", every):
            table[m.start():m.end()] = True
        _WORD_CHAR = table
    return _WORD_CHAR


def codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def doc_chunks(texts: Sequence[str], chars: int = _CHUNK_CHARS) -> Iterator[tuple[int, int]]:
    """Ranges ``[lo, hi)`` of consecutive texts of about ``chars`` characters together (at least one text each): a
    shard's signature made chunk by chunk holds the temporaries of one chunk, not of the shard."""
    lo = 0
    while lo < len(texts):
        hi, size = lo, 0
        while hi < len(texts) and (hi == lo or size + len(texts[hi]) < chars):
            size += len(texts[hi]) + 1
            hi += 1
        yield lo, hi
        lo = hi


# ------------------------------------------------------------------------------------------------ words
@dataclass
class Words:
    """The words of a list of documents: word ``k`` of document ``i`` is ``hashes[offsets[i] + k]``."""

    hashes: np.ndarray
    """uint64 per word: a polynomial hash of its code points modulo 2**64, finalised by `mix64`."""
    offsets: np.ndarray
    """int64 [docs + 1]."""
    starts: np.ndarray
    """int64 per word: where it starts in its document's lowercased text (``lowered[i]``)."""
    ends: np.ndarray
    lowered: list[str]
    numeric: np.ndarray | None = None
    """bool per word, True when it is made of ASCII digits only (filled when asked for)."""

    def text(self, doc: int, first: int, count: int) -> str:
        """Words ``first .. first + count - 1`` of document ``doc`` (indices within the document), space-joined."""
        base = int(self.offsets[doc])
        low = self.lowered[doc]
        return " ".join(low[int(self.starts[base + k]):int(self.ends[base + k])] for k in range(first, first + count))


def words(texts: Sequence[str], numeric: bool = False) -> Words:
    """Tokenise and hash the words of ``texts`` (lowercased), about a million code points at a time.

    Each word's hash is ``sum(c_j * P**j)`` over its code points ``c_j`` (j counted from the word's start), read off
    prefix sums over the word characters, so that no Python code runs per word or per character; the powers needed go
    up to the longest word only (where powers up to the chunk's length would take 8 bytes per code point)."""
    table = word_chars()
    lowered = [t.lower() for t in texts]
    parts: list[tuple[np.ndarray, ...]] = []
    counts = np.zeros(len(lowered), dtype=np.int64)
    for i, j in doc_chunks(lowered):
        chunk = lowered[i:j]
        # A space between documents, so no word runs from one into the next.
        cp = codepoints(" ".join(chunk))
        is_word = table[cp]
        # Word boundaries alternate: start, end, start, end...
        edges = np.flatnonzero(np.diff(is_word.view(np.int8), prepend=np.int8(0), append=np.int8(0)))
        starts, ends = edges[0::2], edges[1::2]
        del edges
        lengths = ends - starts
        h = np.zeros(len(starts), dtype=U64)
        if len(starts):
            letters = cp[is_word]
            # Where each word begins among the word characters, and each character's place within its word: a
            # running count of ones that drops back to 0 at each word's first character.
            first = np.cumsum(lengths) - lengths
            place = np.ones(len(letters), dtype=np.int64)
            place[first[1:]] = 1 - lengths[:-1]
            place[0] = 0
            np.cumsum(place, out=place)
            term = _powers(int(lengths.max()))[place]
            del place
            term *= letters
            del letters
            # Per word, the difference of prefix sums at its two ends (wrapping modulo 2**64 like the terms).
            np.cumsum(term, out=term)
            h = term[first + lengths - 1]
            h[1:] -= term[first[1:] - 1]
            del term, first
        h = mix64(h + lengths.astype(U64))
        doc_start = np.zeros(len(chunk), dtype=np.int64)
        np.cumsum([len(t) + 1 for t in chunk[:-1]], out=doc_start[1:])
        doc = np.searchsorted(doc_start, starts, side="right") - 1
        counts[i:j] = np.bincount(doc, minlength=len(chunk))
        num = None
        if numeric:
            # A word is a number when none of its code points is outside '0'..'9' (a prefix count of non-digits).
            non_digit = np.concatenate([[0], np.cumsum((cp < 48) | (cp > 57))])
            num = (non_digit[ends] - non_digit[starts]) == 0
        parts.append((h, starts - doc_start[doc], ends - doc_start[doc], num))
    offsets = np.zeros(len(lowered) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    def cat(k: int, dtype) -> np.ndarray:
        return np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, dtype=dtype)

    return Words(cat(0, U64), offsets, cat(1, np.int64), cat(2, np.int64), lowered,
                 cat(3, bool) if numeric else None)


def ngrams(h: np.ndarray, offsets: np.ndarray, n: int, short: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the ``n``-grams of consecutive items (words, characters) within each document.

    Returns ``(hashes uint64, first)``: ``first`` is the global index of each n-gram's first item, so its document
    is ``searchsorted(offsets, first, 'right') - 1`` and the n-grams come in document order. With ``short`` a
    document of fewer than ``n`` (but at least one) items gives one shingle made of all its items, as it would
    otherwise have none and could never match anything."""
    total = len(h)
    counts = np.diff(offsets)
    if total == 0:
        return np.zeros(0, dtype=U64), np.zeros(0, dtype=np.int64)
    # A window starting at item i is whole when item i + n - 1 exists in the same document: all but the last n - 1
    # items of each document (a bool per item, where a document number per item would take eight bytes).
    whole = np.ones(total, dtype=bool)
    for k in range(1, n):
        tail = offsets[1:] - k
        whole[tail[tail >= offsets[:-1]]] = False
    g = h.copy()
    short_docs = np.flatnonzero((counts > 0) & (counts < n)) if short else np.zeros(0, dtype=np.int64)
    short_hash = np.zeros(len(short_docs), dtype=U64)
    if len(short_docs):
        at = counts[short_docs] == 1
        short_hash[at] = g[offsets[short_docs[at]]]
    for k in range(1, n):
        # In place: g[i] becomes the hash of items i .. i + k (past the last item, as if followed by zeros).
        g *= _NGRAM_MUL
        if k < total:
            g[:total - k] += h[k:]
        if len(short_docs):
            at = counts[short_docs] == k + 1
            short_hash[at] = g[offsets[short_docs[at]]]
    # The length goes in so that shingles of different lengths never share a hash.
    first = np.flatnonzero(whole)
    del whole
    out = g[first]
    del g
    out ^= U64(n)
    out = mix64(out)
    if len(short_docs):
        sh = mix64(short_hash ^ counts[short_docs].astype(U64))
        first = np.concatenate([first, offsets[short_docs]])
        out = np.concatenate([out, sh])
        order = np.argsort(first, kind="stable")
        first, out = first[order], out[order]
    return out, first


def char_shingles(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the character ``n``-grams of each text, lowercased with every run of non-word characters
    (punctuation, spaces, newlines) collapsed to one space, as ``(hashes, doc)`` with the document of each."""
    table = word_chars()
    hs, docs = [], []
    base = 0
    for lo in range(0, len(texts), 256):
        chunk = [t.lower().replace("\0", " ") for t in texts[lo:lo + 256]]
        cp = codepoints("\0".join(chunk))
        sep = cp == 0
        is_word = table[cp]
        prev_word = np.concatenate([[False], is_word[:-1]])
        keep = is_word | (prev_word & ~is_word) | sep
        cp, sep = cp[keep], sep[keep]
        cp = np.where(table[cp] | sep, cp, np.uint32(32))
        doc = np.cumsum(sep) - sep  # the separator itself belongs to the document before it
        item = ~sep
        counts = np.bincount(doc[item], minlength=len(chunk))
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        h, first = ngrams(mix64(cp[item].astype(U64)), offsets, n)
        hs.append(h)
        docs.append(np.searchsorted(offsets, first, side="right") - 1 + base)
        base += len(chunk)
    if not hs:
        return np.zeros(0, dtype=U64), np.zeros(0, dtype=np.int64)
    return np.concatenate(hs), np.concatenate(docs)


def word_shingles(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the word ``n``-grams of each text as ``(hashes, doc)``, the document of each."""
    w = words(texts)
    h, first = ngrams(w.hashes, w.offsets, n)
    return h, np.searchsorted(w.offsets, first, side="right") - 1


# ------------------------------------------------------------------------------------------------ MinHash
class MinHasher:
    """MinHash signatures (Broder 1997) of many documents at once.

    Permutation k of a shingle x (the top 32 bits of its 64-bit hash) is ``((a_k * x + b_k) mod 2**64) >> 32``
    with random 64-bit a_k, b_k: the multiply-add-shift scheme, strongly universal for 32-bit keys (Dietzfelbinger
    1996; Thorup 2015, "High speed hashing for integers and strings"), in plain uint64 arithmetic, so numpy
    evaluates it without the 128-bit products that ``(a*x + b) mod (2**61 - 1)`` needs. Since ``>> 32`` is monotone,
    the minimum is taken on the full 64-bit values and shifted once at the end."""

    def __init__(self, num_perm: int, seed: int):
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = rng.integers(0, 2**64 - 1, num_perm, dtype=U64, endpoint=True)[:, None]
        self.b = rng.integers(0, 2**64 - 1, num_perm, dtype=U64, endpoint=True)[:, None]
        # Permutations x shingles, about 8 MB: big enough for numpy to stream, small enough to stay in cache.
        self.chunk = max(1024, (1 << 23) // (8 * num_perm))

    def __call__(self, shingles: np.ndarray, doc: np.ndarray, docs: int) -> np.ndarray:
        """uint32 [docs, num_perm] signatures; ``doc`` (sorted) gives each shingle's document. A document
        without shingles gets all 0xFFFFFFFF (callers keep it out of any comparison)."""
        sig = np.full((self.num_perm, docs), np.iinfo(np.uint64).max, dtype=U64)
        x = shingles >> U64(32)
        buf = np.empty((self.num_perm, self.chunk), dtype=U64)
        for lo in range(0, len(x), self.chunk):
            xc, dc = x[lo:lo + self.chunk], doc[lo:lo + self.chunk]
            b = buf[:, :len(xc)]
            np.multiply(self.a, xc[None, :], out=b)
            b += self.b
            seg = np.flatnonzero(np.concatenate([[True], dc[1:] != dc[:-1]]))
            d = dc[seg]
            sig[:, d] = np.minimum(sig[:, d], np.minimum.reduceat(b, seg, axis=1))
        return np.ascontiguousarray((sig >> U64(32)).astype(np.uint32).T)


def band_hashes(sig: np.ndarray, bands: int, rows: int, seed: int) -> np.ndarray:
    """uint64 [docs, bands]: band j hashes signature rows ``j*rows .. (j+1)*rows - 1`` (a random multilinear
    combination, finalised by `mix64`); two documents share a bucket in band j when all those rows agree."""
    rng = np.random.default_rng(seed + 1)
    mult = rng.integers(0, 2**64 - 1, (bands, rows), dtype=U64, endpoint=True) | U64(1)
    x = sig[:, :bands * rows].reshape(len(sig), bands, rows).astype(U64)
    x *= mult[None]
    return mix64(x.sum(axis=2, dtype=U64) + np.arange(bands, dtype=U64)[None])


def optimal_bands(threshold: float, num_perm: int, miss_weight: float = 0.5) -> tuple[int, int]:
    """Bands and rows (bands * rows <= num_perm) minimising the weighted false positive plus false negative areas
    under the LSH S-curve ``1 - (1 - s**rows)**bands`` around ``threshold`` (Leskovec et al., Mining of Massive
    Datasets ch. 3.4; the same integrals as datasketch's ``_optimal_param``, whose ``weights`` are
    ``(1 - miss_weight, miss_weight)``)."""
    s = np.linspace(0.0, 1.0, 2001)
    below, above = s <= threshold, s >= threshold
    best, best_err = (1, 1), np.inf
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1)
        p = 1.0 - (1.0 - s[None, :] ** r[:, None]) ** b
        fp = np.trapezoid(p[:, below], s[below], axis=1)
        fn = np.trapezoid(1.0 - p[:, above], s[above], axis=1)
        err = (1.0 - miss_weight) * fp + miss_weight * fn
        k = int(np.argmin(err))
        if err[k] < best_err - 1e-12:
            best, best_err = (b, int(r[k])), float(err[k])
    return best


def bucket_pairs(bands: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs ``(u, v)``, u < v, of rows sharing a bucket in some band: each row is paired with the first
    row of its bucket (a star per bucket, enough for connected components), duplicates removed."""
    us, vs = [], []
    rows = np.arange(len(bands), dtype=np.int64)
    if valid is not None:
        rows = rows[valid]
        bands = bands[valid]
    for j in range(bands.shape[1]):
        col = bands[:, j]
        order = np.argsort(col, kind="stable")
        sc = col[order]
        new = np.concatenate([[True], sc[1:] != sc[:-1]])
        if new.all():
            continue
        head = order[np.maximum.accumulate(np.where(new, np.arange(len(sc)), 0))]
        dup = ~new
        us.append(rows[head[dup]])
        vs.append(rows[order[dup]])
    if not us:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u, v = np.concatenate(us), np.concatenate(vs)
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    pairs = np.unique(np.stack([lo, hi], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


def components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of the graph with edges ``(u, v)``: each node's label is the smallest node of its
    component. Union-find done the data-parallel way (hook roots onto the smaller root, then compress paths by
    pointer jumping, as in Shiloach & Vishkin 1982), so it runs in numpy over all edges at once."""
    parent = np.arange(n, dtype=np.int64)
    if len(u) == 0:
        return parent
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            return parent
        lo = np.minimum(pu, pv)[differ]
        np.minimum.at(parent, pu[differ], lo)
        np.minimum.at(parent, pv[differ], lo)
        while True:
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped


def member(x: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """``np.isin(x, sorted_set)`` for an already sorted set, by binary search (the set is not sorted again)."""
    if not len(sorted_set):
        return np.zeros(len(x), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, x), len(sorted_set) - 1)
    return sorted_set[at] == x


def agreement(sig: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values between rows u and v of ``sig``: the estimated Jaccard similarity."""
    out = np.empty(len(u), dtype=np.float64)
    for lo in range(0, len(u), 65536):
        out[lo:lo + 65536] = (sig[u[lo:lo + 65536]] == sig[v[lo:lo + 65536]]).mean(axis=1)
    return out


def group_ranges(counts: np.ndarray, per_pass: int) -> list[tuple[int, int]]:
    """Consecutive ranges ``[lo, hi)`` of ``counts`` adding up to at most ``per_pass`` each (one entry larger than
    that alone), as few as that allows: the passes of a partitioned hash join."""
    ranges, lo, acc = [], 0, 0
    for u, c in enumerate(counts.tolist()):
        if acc and acc + c > per_pass:
            ranges.append((lo, u))
            lo, acc = u, 0
        acc += c
    ranges.append((lo, len(counts)))
    return ranges


# ------------------------------------------------------------------------------------------------ references
def read_references(paths: Sequence[str], batch: int = 2048) -> Iterator[tuple[list[str], list[str]]]:
    """The ``text`` of every line of the canonical JSONL reference files, ``batch`` at a time, with a short source
    for each (``file.jsonl:line``)."""
    for path in paths:
        texts, where = [], []
        try:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line).get("text")
                    except (json.JSONDecodeError, AttributeError):
                        raise DataError(f"{path}:{lineno}: not a JSON object") from None
                    if not isinstance(text, str) or not text:
                        continue
                    texts.append(text)
                    where.append(f"{os.path.basename(path)}:{lineno}")
                    if len(texts) >= batch:
                        yield texts, where
                        texts, where = [], []
        except OSError as e:
            raise DataError(f"cannot read the reference file {path}: {e.strerror}") from None
        if texts:
            yield texts, where


# ------------------------------------------------------------------------------------------------ spilling
class Spill:
    """Shard arrays written to a temporary folder while ``decide`` reads its one pass of signatures, to be read
    again by later passes: memory stays bounded by what is read at a time, not by the corpus.

    `read` loads a whole array (for a scan, freed with it), `part` a contiguous range, `get` memory-maps it for
    scattered reads. The pages of a mapped file that were read count in the process's resident memory until the map
    is closed, so no map is kept: each lives as long as its caller holds it."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="stemma-curate-")
        self._layout: dict[tuple[int, str], tuple[int, np.dtype, tuple[int, ...]]] = {}

    def _path(self, shard: int, name: str) -> str:
        return os.path.join(self._dir.name, f"{shard}.{name}.npy")

    def put(self, shard: int, **arrays: np.ndarray) -> None:
        for name, arr in arrays.items():
            with open(self._path(shard, name), "wb") as f:
                np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
                arr = np.asarray(arr)
                # Where the data starts, to read a range of it without mapping the file.
                self._layout[(shard, name)] = (f.tell() - arr.nbytes, arr.dtype, arr.shape)

    def read(self, shard: int, name: str) -> np.ndarray:
        """The whole array, read into memory."""
        return np.load(self._path(shard, name), allow_pickle=False)

    def part(self, shard: int, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start .. stop - 1`` of the array, read into memory."""
        at, dtype, shape = self._layout[(shard, name)]
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        with open(self._path(shard, name), "rb") as f:
            f.seek(at + start * row)
            return np.fromfile(f, dtype=dtype, count=(stop - start) * row // dtype.itemsize).reshape(-1, *shape[1:])

    def get(self, shard: int, name: str) -> np.ndarray:
        """The array, memory-mapped (the operating system pages in what is read)."""
        return np.load(self._path(shard, name), mmap_mode="r", allow_pickle=False)

    def gather(self, name: str, starts: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (corpus-wide indices, any order) of the 2-d array ``name`` spilled per shard, shard ``i``
        holding the rows from ``starts[i]``: each shard's file is read once."""
        shard = np.searchsorted(starts, rows, side="right") - 1
        out = None
        for s in np.unique(shard).tolist():
            sig = self.get(s, name)
            at = shard == s
            if out is None:
                out = np.empty((len(rows), sig.shape[1]), dtype=sig.dtype)
            out[at] = sig[rows[at] - starts[s]]
        return out

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
