"""The license step: texts and notices detected as SPDX ids, checked against the declared licence."""

import json
import re
from pathlib import Path

import pytest

from stemma.data.curate.base import CurateContext, Doc, Drop, StepStats
from stemma.data.curate.steps.license import TEXT_RULES, LicenseConfig, LicenseDetect

CORPUS = Path(__file__).resolve().parents[3] / "examples" / "demo" / "corpus"

MIT = """Copyright (c) 2024 Jane Doe

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND."""

GPL3_NOTICE = """/* frob.c - frobnicate the widgets
 *
 * This program is free software: you can redistribute it and/or modify
 * it under the terms of the GNU General Public License as published by
 * the Free Software Foundation, either version 3 of the License, or
 * (at your option) any later version.
 */
int frob(void);"""

MAN_PAGE = """LS(1)                            User Commands                           LS(1)

NAME
       ls - list directory contents

DESCRIPTION
       List information about the FILEs (the current directory by default).

       --version
              output version information and exit; the license and the
              warranty disclaimer are printed with it.

       A license key, if any, is read from $HOME/.lsrc (see the licensing
       section of the manual); kernel modules must be GPL compatible.

SEE ALSO
       dir(1), vdir(1)"""


@pytest.fixture(scope="module")
def step() -> LicenseDetect:
    s = LicenseDetect(LicenseConfig(), CurateContext(name="t", license="MIT"))
    s.setup()
    return s


def _doc(text: str, **meta) -> Doc:
    return Doc(id="0123456789abcdef", text=text, split="train", meta=meta)


def test_mit_text_is_mit_and_agrees_with_its_declaration(step):
    stats = StepStats(step="license")
    doc = step.apply(_doc(MIT, license="MIT"), stats)
    assert doc.meta["license_detected"] == ["MIT"]
    assert "license_conflict" not in doc.meta
    assert stats.kinds == {"license:MIT": 1}


def test_gpl3_notice_in_a_document_declared_mit_is_a_conflict(step):
    stats = StepStats(step="license")
    doc = step.apply(_doc(GPL3_NOTICE, license="MIT"), stats)
    assert isinstance(doc, Doc)
    assert doc.meta["license_detected"] == ["GPL-3.0-or-later"]
    assert doc.meta["license_conflict"] == ["GPL-3.0-or-later"]
    assert stats.kinds == {"license:GPL-3.0-or-later": 1, "license_conflict": 1}
    assert stats.examples[0]["action"] == "flagged"
    assert stats.examples[0]["evidence"] == "text carries GPL-3.0-or-later; declared MIT"


def test_the_datasets_declared_licence_is_used_when_the_document_has_none(step):
    stats = StepStats(step="license")
    doc = step.apply(_doc(GPL3_NOTICE), stats)  # the context declares MIT
    assert doc.meta["license_conflict"] == ["GPL-3.0-or-later"]
    ok = step.apply(_doc(GPL3_NOTICE, license="GPL-3.0-or-later OR MIT"), StepStats(step="license"))
    assert "license_conflict" not in ok.meta


def test_drop_action_drops_the_conflict():
    s = LicenseDetect(LicenseConfig(action="drop"), CurateContext(name="t"))
    s.setup()
    out = s.apply(_doc(GPL3_NOTICE, license="Apache-2.0"), StepStats(step="license"))
    assert out == Drop("license_conflict", "text carries GPL-3.0-or-later; declared Apache-2.0")


def test_documents_without_licence_text_are_untouched(step):
    stats = StepStats(step="license")
    for text in ["The read() system call reads up to count bytes from fd into buf.", MAN_PAGE,
                 "Metadata-Version: 2.0\nName: requests\nLicense: Apache 2.0\nLocation: /usr/lib",
                 "This option prints the version number, license, and disclaimer of warranty."]:
        doc = step.apply(_doc(text, license="GPL-2.0-only"), stats)
        assert doc.meta == {"license": "GPL-2.0-only"}, text
    assert stats.kinds == {}


def test_spdx_header_expression_is_parsed(step):
    text = "// SPDX-License-Identifier: Apache-2.0 OR MIT\nfn main() {}\n"
    assert step.detect(text) == ["Apache-2.0", "MIT"]
    assert step.detect("# SPDX-License-Identifier: GPL-2.0+\n") == ["GPL-2.0-or-later"]
    assert step.detect("/* SPDX-License-Identifier: BSD-3-Clause */\n") == ["BSD-3-Clause"]
    assert step.detect("SPDX-License-Identifier: Not-A-Licence\n") == []
    stats = StepStats(step="license")
    assert "license_conflict" not in step.apply(_doc(text, license="MIT OR Apache-2.0"), stats).meta


@pytest.mark.parametrize("text, expected", [
    ("This program is distributed under the terms of the GNU General Public License as published by the Free "
     "Software Foundation; either version 2 of the License, or (at your option) any later version.",
     ["GPL-2.0-or-later"]),
    ("Sie können es unter den Bedingungen der GNU General Public License in der von der Free Software Foundation "
     "veröffentlichten Fassung weiterverteilen. Dabei haben Sie die Wahl zwischen der Version 2 der Lizenz oder "
     "irgendeiner späteren Version.", ["GPL-2.0-or-later"]),
    ("frob is covered by the GNU General Public License. Version 2 of frob adds colours.", []),
    ("The bpf() program's license string must be GPL compatible; \"Dual BSD/GPL\" works.", []),
    ("Type \"help\", \"copyright\", \"credits\" or \"license\" for more information.", []),
    ("You can redistribute it under the terms of the GNU General Public License, version 2, as published by the "
     "Free Software Foundation.", ["GPL-2.0-only"]),
    ("This library is free software; you can redistribute it under the terms of the GNU Lesser General Public "
     "License as published by the Free Software Foundation; either version 2.1 of the License, or (at your option) "
     "any later version.", ["LGPL-2.1-or-later"]),
    ("Copyright © 2022 Free Software Foundation, Inc. License GPLv3+: GNU GPL version 3 or later "
     "<https://gnu.org/licenses/gpl.html>.", ["GPL-3.0-or-later"]),
    ("Copyright © 2023 Antonio Diaz Diaz. Lizenz GPLv2+: GNU GPL Version 2\n"
     "⟨https://www.gnu.org/licenses/old-licenses/gpl-2.0.html⟩ oder neuer.", ["GPL-2.0-or-later"]),
    ("Licence GPLv3+ : GNU GPL version 3 ou ultérieure <https://gnu.org/licenses/gpl.html>.", ["GPL-3.0-or-later"]),
    ("Permission is granted to copy, distribute and/or modify this document under the terms of the GNU Free "
     "Documentation License, Version 1.3 or any later version published by the Free Software Foundation.",
     ["GFDL-1.3-or-later"]),
    ("Licensed under the Apache License, Version 2.0 (the \"License\"); you may not use this file except in "
     "compliance with the License.", ["Apache-2.0"]),
    ("This Source Code Form is subject to the terms of the Mozilla Public License, v. 2.0.", ["MPL-2.0"]),
    ("Text is available under the Creative Commons Attribution-ShareAlike 4.0 International License.",
     ["CC-BY-SA-4.0"]),
    ("Photo: Jane Doe, CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)", ["CC-BY-4.0"]),
    ("This is free and unencumbered software released into the public domain.", ["Unlicense"]),
    ("Permission to use, copy, modify, and/or distribute this software for any purpose with or without fee is "
     "hereby granted, provided that the above copyright notice and this permission notice appear in all copies.",
     ["ISC"]),
])
def test_notices_and_short_texts(step, text, expected):
    assert step.detect(text) == expected


def test_bsd_variants_are_told_apart_by_their_clauses(step):
    pre = ("Redistribution and use in source and binary forms, with or without modification, are permitted "
           "provided that the following conditions are met:\n1. Redistributions of source code must retain the above "
           "copyright notice, this list of conditions and the following disclaimer.\n2. Redistributions in binary "
           "form must reproduce the above copyright notice.\n")
    end = "THIS SOFTWARE IS PROVIDED BY THE AUTHOR ``AS IS'' AND ANY EXPRESS OR IMPLIED WARRANTIES ARE DISCLAIMED."
    three = "3. Neither the name of the copyright holder nor the names of its contributors may be used to endorse.\n"
    four = ("3. All advertising materials mentioning features or use of this software must display the following "
            "acknowledgement.\n")
    assert step.detect(pre + end) == ["BSD-2-Clause"]
    assert step.detect(pre + three + end) == ["BSD-3-Clause"]
    assert step.detect(pre + four + three + end) == ["BSD-4-Clause"]


def test_shipped_licence_texts_are_detected_as_what_they_are():
    """en-legal.jsonl: /usr/share/common-licenses and two licence pages, each detected as its title says."""
    expected = {"Apache-2.0": ["Apache-2.0"], "Artistic": ["Artistic-1.0-Perl"], "BSD": ["BSD-3-Clause"],
                "CC0-1.0": ["CC0-1.0"], "GFDL-1.2": ["GFDL-1.2-only"], "GFDL-1.3": ["GFDL-1.3-only"],
                "GPL-1": ["GPL-1.0-only"], "GPL-2": ["GPL-2.0-only"], "GPL-3": ["GPL-3.0-only"],
                "LGPL-2": ["LGPL-2.0-only"], "LGPL-2.1": ["LGPL-2.1-only"], "LGPL-3": ["LGPL-3.0-only"],
                "MPL-1.1": ["MPL-1.1"], "MPL-2.0": ["MPL-2.0"]}
    s = LicenseDetect(LicenseConfig(), CurateContext(name="t"))
    s.setup()
    stats = StepStats(step="license")
    seen = set()
    for line in (CORPUS / "en-legal.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        doc = s.apply(_doc(row["text"], license=row["license"]), stats)
        m = re.match(r"Licence text: (\S+)", row["title"])
        if m:
            # the full text only: the GPL's own "or any later version" appendix and the MPL-2.0's list of secondary
            # GNU licences are words of the text, not notices of their own
            assert doc.meta["license_detected"] == expected[m.group(1)], row["title"]
            seen.add(m.group(1))
        elif row["license"] == "PSF-2.0":
            assert {"PSF-2.0", "Python-2.0", "0BSD"} <= set(doc.meta["license_detected"])
        else:
            assert doc.meta["license_detected"] == ["Vim"]  # uganda.txt, the Vim licence
    assert seen == set(expected)
    # the texts are declared "verbatim-copying-permitted", which is no SPDX expression: reported, not judged
    assert stats.kinds["license_unknown_declared"] == 14


def test_demo_man_pages_notices_agree_with_their_declared_licence():
    s = LicenseDetect(LicenseConfig(), CurateContext(name="t"))
    s.setup()
    stats = StepStats(step="license")
    for line in (CORPUS / "en-manpages.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        s.apply(_doc(row["text"], license=row["license"]), stats)
    # coreutils, grep, tar: "License GPLv3+"; run-parts: "GNU General Public License version 2 or later"
    assert stats.kinds == {"license:GPL-3.0-or-later": 106, "license:GPL-2.0-or-later": 1}


def test_declared_licence_forms(step):
    text = GPL3_NOTICE
    for declared, kinds in [("verbatim-copying-permitted", {"license_unknown_declared": 1}),
                            ("GPL-3.0-only", {}),  # same licence, another version qualifier: no conflict
                            ("GPL-3.0+", {}),
                            ("LicenseRef-Proprietary", {"license_conflict": 1}),  # valid SPDX, another licence
                            ("GPL-2.0-or-later", {"license_conflict": 1})]:
        stats = StepStats(step="license")
        step.apply(_doc(text, license=declared), stats)
        assert stats.kinds == {"license:GPL-3.0-or-later": 1, **kinds}, declared


def test_every_rule_names_an_spdx_licence(step):
    for rule in TEXT_RULES:
        assert step.spdx.canonical(rule.spdx) == rule.spdx


def test_bad_action_is_refused():
    with pytest.raises(ValueError):
        LicenseConfig(action="tag").check()
