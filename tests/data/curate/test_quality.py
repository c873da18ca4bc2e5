"""gopher_quality, gopher_repetition and c4: each rule trips on a document made for it, a plain English paragraph
passes them all, and the word tokenizer splits as spaCy's blank English tokenizer (datatrove's) does.

The expected decisions were checked against datatrove 0.10.1's filters on the same documents."""

import random
from collections import Counter

import pytest

from stemma.data.curate.base import CurateContext, Doc, Drop, StepStats
from stemma.data.curate.steps.quality import (
    C4Quality,
    GopherQuality,
    GopherRepetition,
    GopherRepetitionConfig,
    _english_words,
    _JoinedNgrams,
    _top_ngram_chars,
    _word_ids,
)

P = ("The river flows through the valley and feeds the farms that line its banks. Farmers have grown wheat and "
     "barley there for many generations. In spring the water rises quickly, so the villages keep their boats ready. "
     "Children learn to swim early, and most of them can row before they are ten. The old mill by the bridge still "
     "grinds flour with the power of the current. Visitors come in summer to walk the paths along the water and to "
     "watch the herons fish. In the evening the light turns gold over the hills, and the valley becomes very quiet. "
     "Many people who leave for the city return when they are older.")
SENTENCES = P.split(". ")


def run(cls, text: str, **config):
    step = cls(cls.config_cls(**config), CurateContext(name="t", language="en"))
    step.setup()
    stats = StepStats(step=cls.name)
    doc = Doc(id="d", text=text, split="train", meta={})
    return step.apply(doc, stats), stats


def reason(cls, text: str, **config) -> str:
    out, _ = run(cls, text, **config)
    return out.reason if isinstance(out, Drop) else "keep"


# ------------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("text,tokens", [
    ("Don't stop: it's 10km (about 6mi) away, isn't it?",
     ["Do", "n't", "stop", ":", "it", "'s", "10", "km", "(", "about", "6mi", ")", "away", ",", "is", "n't", "it",
      "?"]),
    ("See e.g. the U.S. rules, i.e., Mr. Smith's.",
     ["See", "e.g.", "the", "U.S.", "rules", ",", "i.e.", ",", "Mr.", "Smith", "'s", "."]),
    ("Visit https://example.com/a-b?x=1 or www.example.org.",
     ["Visit", "https://example.com/a-b?x=1", "or", "www.example.org", "."]),
    ("C++ and rock'n'roll cost $5.99 (or US$6)!",
     ["C++", "and", "rock'n'roll", "cost", "$", "5.99", "(", "or", "US$", "6", ")", "!"]),
    ("hello...world, well-known, 3-4 x:y a/b",
     ["hello", "...", "world", ",", "well", "-", "known", ",", "3", "-", "4", "x", ":", "y", "a", "/", "b"]),
    ("foo): bar(:) 1am 10p.m. °C. cannot gonna",
     ["foo", "):", "bar", "(:", ")", "1", "am", "10", "p.m.", "°", "C", ".", "can", "not", "gon", "na"]),
    ("“Quoted” ‘text’ — dash–dash, «guillemets» …ellipsis",
     ["“", "Quoted", "”", "‘", "text", "’", "—", "dash", "–", "dash", ",", "«", "guillemets", "»", "…", "ellipsis"]),
    ("über-cool Straße naïve café.", ["über", "-", "cool", "Straße", "naïve", "café", "."]),
    ("#hashtag @user 100% 5+3=8 key=value α-β",
     ["#", "hashtag", "@user", "100", "%", "5", "+", "3=8", "key", "=", "value", "α", "-", "β"]),
])
def test_words_split_as_spacy_english(text, tokens):
    assert _english_words().words(text) == tokens


# ------------------------------------------------------------------------------------------------ gopher_quality
def test_plain_paragraph_passes_every_rule():
    for cls in (GopherQuality, GopherRepetition):
        out, _ = run(cls, P)
        assert not isinstance(out, Drop) and out.text == P
    out, stats = run(C4Quality, P)
    assert not isinstance(out, Drop) and out.text == P and not stats.kinds


@pytest.mark.parametrize("text,expected", [
    ("The river flows through the valley and feeds the farms.", "gopher_short_doc"),
    ("word " * 100_001 + "the and", "gopher_long_doc"),
    (" ".join(["a", "to", "be", "of", "it", "is", "an", "at", "by", "we"] * 8), "gopher_below_avg_threshold"),
    (" ".join(["internationalization", "the", "characterization", "and", "incomprehensibilities"] * 20),
     "gopher_above_avg_threshold"),
    (P + " " + " ".join(["#"] * 25), "gopher_too_many_hashes"),
    (P + " " + " ".join(["wait... then"] * 20) + " done.", "gopher_too_many_ellipsis"),
    ("\n".join("- " + s for s in SENTENCES), "gopher_too_many_bullets"),
    ("\n".join(s + "..." for s in SENTENCES[:4]) + "\n" + ". ".join(SENTENCES[4:]), "gopher_too_many_end_ellipsis"),
    (P + " " + " ".join(str(i) for i in range(30)), "gopher_below_alpha_threshold"),
    (" ".join(w for w in P.replace(".", " ").replace(",", " ").split()
              if w.lower() not in ("the", "be", "to", "of", "and", "that", "have", "with")),
     "gopher_enough_stop_words"),
])
def test_gopher_quality_rules(text, expected):
    assert reason(GopherQuality, text) == expected


def test_gopher_quality_thresholds_are_config():
    assert reason(GopherQuality, P, min_doc_words=200) == "gopher_short_doc"
    assert reason(GopherQuality, P, min_stop_words=9) == "gopher_enough_stop_words"
    assert reason(GopherQuality, "The river flows through the valley", min_doc_words=None) == \
        "gopher_enough_stop_words"
    assert reason(GopherQuality, "The river flows through the valley", min_doc_words=0, min_stop_words=None) == "keep"
    bullets = "\n".join("- " + s for s in SENTENCES)
    assert reason(GopherQuality, bullets, max_bullet_lines_ratio=None) == "keep"


# --------------------------------------------------------------------------------------------- gopher_repetition
@pytest.mark.parametrize("text,expected", [
    ("", "empty"),
    ("\n\n".join([SENTENCES[0], SENTENCES[1], SENTENCES[0], SENTENCES[2], SENTENCES[0]]), "dup_para_frac"),
    ("\n\n".join([P, "A short one.", "Another short one.", "Third short one.", "Fourth short one.", P]),
     "dup_para_char_frac"),
    ("\n".join([SENTENCES[0], SENTENCES[1], SENTENCES[0], SENTENCES[2], SENTENCES[0]]), "dup_line_frac"),
    ("\n".join([P, "A short one.", "Another short one.", "Third short one.", "Fourth short one.", P]),
     "dup_line_char_frac"),
    (P + " " + " ".join(["big cat"] * 40), "top_2_gram"),
    (P + " " + " ".join(f"big red dog w{i}x" for i in range(20)), "top_3_gram"),
    (P + " " + " ".join(f"big red dog cat w{i}x" for i in range(12)), "top_4_gram"),
    (P + " " + " ".join([SENTENCES[0], SENTENCES[1], SENTENCES[3], SENTENCES[0], SENTENCES[1]]),
     "duplicated_5_n_grams"),
])
def test_gopher_repetition_rules(text, expected):
    assert reason(GopherRepetition, text) == expected


def test_duplicated_ngrams_compare_words_joined_without_spaces():
    # "ab c d e f" and "a bc d e f" are the same 5-gram for datatrove (words joined without a space).
    filler = " ".join(f"w{i}x" for i in range(20))
    text = f"ab c d e f {filler} a bc d e f"
    assert reason(GopherRepetition, text, top_n_grams=(), dup_n_grams=((5, 0.04),)) == "duplicated_5_n_grams"
    assert reason(GopherRepetition, text, top_n_grams=(), dup_n_grams=((5, 0.06),)) == "keep"


def test_ngram_counts_equal_datatrove_definitions_on_random_repetitive_texts():
    def find_all_duplicate(words, n):  # datatrove.pipeline.filters.gopher_repetition_filter, verbatim logic
        unique, repeated, idx = set(), 0, 0
        while idx < len(words) - n + 1:
            gram = "".join(words[idx:idx + n])
            if gram in unique:
                repeated += len(gram)
                idx += n
            else:
                unique.add(gram)
                idx += 1
        return repeated

    def find_top_duplicate(words, n):
        grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
        gram, k = Counter(grams).most_common(1)[0] if grams else ("", 0)
        return len(gram) * k

    rng = random.Random(0)
    vocab = ["a", "b", "ab", "ba", "c", "bc", "abc", "é"]  # joined n-grams collide: "ab"+"c" == "a"+"bc"
    for _ in range(300):
        words = [rng.choice(vocab[:rng.randint(2, 8)]) for _ in range(rng.randint(0, 50))]
        joined, ids = _JoinedNgrams(words), _word_ids(words)
        for n in range(1, 11):
            assert joined.repeated_chars(n, 1) == find_all_duplicate(words, n)
            assert _top_ngram_chars(words, ids, n)[0] == find_top_duplicate(words, n)


def test_gopher_repetition_config_check():
    GopherRepetitionConfig().check()
    with pytest.raises(ValueError):
        GopherRepetitionConfig(top_n_grams=((0, 0.2),)).check()


# ------------------------------------------------------------------------------------------------------------ c4
MIXED = ("Menu Home About\n   " + P.replace("banks. ", "banks.[1][citation needed] ") + "  \n"
         "Please enable JavaScript to view the comments.\n"
         "Read our privacy policy before you continue.\n"
         "Short line.\n"
         "This line has no end mark\n"
         "A line with " + "x" * 1001 + " in it.\n")


def test_c4_removes_lines_and_counts_them():
    out, stats = run(C4Quality, MIXED)
    assert not isinstance(out, Drop)
    assert out.text == P
    assert dict(stats.kinds) == {"line-filter-no_terminal_punc": 2, "line-filter-javascript": 1,
                                 "line-filter-policy": 1, "line-filter-too_few_words": 1,
                                 "line-filter-too_long_word": 1}


@pytest.mark.parametrize("switch,kept_line", [
    ({"filter_javascript": False}, "Please enable JavaScript to view the comments."),
    ({"filter_policy": False}, "Read our privacy policy before you continue."),
    ({"min_words_per_line": None}, "Short line."),
    ({"filter_no_terminal_punct": False}, "This line has no end mark"),
    ({"max_word_length": None}, "A line with " + "x" * 1001 + " in it."),
])
def test_c4_each_line_rule_can_be_switched_off(switch, kept_line):
    out, _ = run(C4Quality, MIXED, **switch)
    assert kept_line in out.text.split("\n")


def test_c4_citations_kept_when_asked():
    out, _ = run(C4Quality, MIXED, remove_citations=False)
    assert "banks.[1][citation needed] Farmers" in out.text


@pytest.mark.parametrize("text,expected", [
    (P + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    (P + "\nThe function returns {x: 1} for every input.", "curly_bracket"),
    ("One sentence is here. Another one follows it.\nA third line comes now.", "too_few_sentences"),
])
def test_c4_document_rules(text, expected):
    assert reason(C4Quality, text) == expected


def test_c4_document_rules_can_be_switched_off():
    assert reason(C4Quality, P + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
                  filter_lorem_ipsum=False) == "keep"
    assert reason(C4Quality, P + "\nThe function returns {x: 1} for every input.", filter_curly_bracket=False) == "keep"
    assert reason(C4Quality, "One sentence is here. Another one follows it.", min_num_sentences=None) == "keep"
    assert reason(C4Quality, "One sentence is here. Another one follows it.", min_num_sentences=2) == "keep"
    assert reason(C4Quality, "One sentence is here. Another one follows it.", min_num_sentences=3) == \
        "too_few_sentences"


def test_c4_counts_sentences_as_spacy_sentencizer():
    # "..." and "B." are no sentence ends for spaCy's sentencizer; "(world)." is one.
    assert reason(C4Quality, "A first one... B. C is here.", min_num_sentences=2) == "too_few_sentences"
    assert reason(C4Quality, "Hello (world). Next one is here.", min_num_sentences=2) == "keep"
