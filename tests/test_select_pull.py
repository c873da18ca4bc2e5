"""Selection under budgets, pulling for a device (HF, safetensors, GGUF in llama.cpp), the trade-off plot."""

import json

import pytest
import torch

from stemma.errors import StemmaError
from stemma.footprint import stored
from stemma.select import Profile, parse_bytes, parse_ms, select

SP = "en/software/python"


def test_sizes_and_latencies_parse():
    assert parse_bytes("300MB") == 300_000_000 and parse_bytes("1.5GiB") == int(1.5 * 2**30)
    assert parse_ms("25ms") == 25 and parse_ms("0.5s") == 500
    with pytest.raises(StemmaError, match="memory size"):
        parse_bytes("lots")


def test_select_never_picks_a_version_over_the_memory_budget(variants):
    ws = variants["ws"]
    sel = select(ws, "en", "software/python")
    mems = sorted({c.memory for c in sel.ranked})
    assert {c.node for c in sel.ranked} >= {SP, "en/software", "en", "master", f"{SP}/int8", f"{SP}/int4"}
    assert "en/legal" not in {c.node for c in sel.ranked}
    budgets = [mems[0] - 1] + [m + d for m in mems for d in (-1, 0, 1)] + [mems[-1] * 2]
    for budget in budgets:
        s = select(ws, "en", "software/python", memory_bytes=budget)
        fitting = [c for c in s.ranked if c.memory <= budget]
        if not fitting:
            assert s.choice is None
            with pytest.raises(StemmaError, match="nothing fits: closest is .* over the"):
                s.require()
            continue
        assert s.choice is not None and s.choice.memory <= budget
        assert s.choice.perplexity == min(c.perplexity for c in fitting)
        for c in s.ranked[1:]:
            assert c.reason and ("worse than" in c.reason or "as good as" in c.reason or "over the" in c.reason)


def test_select_explains_latency_and_quality_misses_and_scales_to_the_target_machine(variants):
    ws = variants["ws"]
    base = select(ws, "en", "software/python")
    fastest = min(c.ms_per_token for c in base.ranked)
    s = select(ws, "en", "software/python", latency_ms=fastest / 2)
    assert s.choice is None and "ms/token" in s.nothing_fits()
    # The same budget on a machine twice as fast (by GEMM throughput) halves every measured latency.
    gflops = stored(ws, base.ranked[0].version.id).machine["gemm_gflops"]
    s2 = select(ws, "en", "software/python", latency_ms=fastest * 0.6, machine={"gemm_gflops": gflops * 2})
    assert s2.choice is not None
    worst = max(c.perplexity for c in base.ranked)
    s3 = select(ws, "en", "software/python", min_quality=min(c.perplexity for c in base.ranked) * 0.5)
    assert s3.choice is None and "perplexity" in s3.nothing_fits() and worst > 0


def test_select_refuses_unknown_nodes(variants):
    with pytest.raises(StemmaError, match="unknown node 'xx/software'"):
        select(variants["ws"], "xx", "software")


def test_profile_file_drives_select(variants, tmp_path):
    p = tmp_path / "device.json"
    p.write_text(json.dumps({"language": "en", "domain": "software/python", "memory": "10GB"}))
    prof = Profile.load(p)
    assert prof.memory_bytes == 10**10
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ram": 3}))
    with pytest.raises(StemmaError, match="unknown field"):
        Profile.load(bad)


@pytest.mark.parametrize("node", [f"{SP}/int8", f"{SP}/int4", f"{SP}/lowrank", f"{SP}/sparse", SP])
def test_pulled_hf_directory_loads_in_plain_transformers_with_stemmas_logits(variants, node, tmp_path):
    from transformers import AutoModelForCausalLM

    from stemma.pull import pull

    ws = variants["ws"]
    v = ws.resolve_version(node)
    out = pull(ws, v, tmp_path / "hf", "hf")
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 500, (1, 24))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ws.load_model(v.id)(input_ids=ids).logits, atol=1e-4)
    card = (out / "README.md").read_text()
    meta = card.split("---")[1]
    for key in ("base_model:", "base_model_relation:", "datasets:", "license:", "model-index:"):
        assert key in meta
    assert f"stemma:{v.row.parent_id}" in meta


def test_pulled_safetensors_keeps_the_compressed_form(variants, tmp_path):
    from stemma.compress.layers import load_variant
    from stemma.pull import pull

    ws = variants["ws"]
    v = ws.resolve_version(f"{SP}/int4")
    out = pull(ws, v, tmp_path / "st", "safetensors")
    assert (out / "variant.safetensors").stat().st_size == ws.store.size(v.manifest["files"]["variant.safetensors"])
    m = load_variant({n: out / n for n in ("config.json", "variant.json", "variant.safetensors")})
    ids = torch.randint(0, 500, (1, 16))
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, ws.load_model(v.id)(input_ids=ids).logits)


def test_pull_errors_leave_nothing_behind(variants, tmp_path):
    from stemma.pull import pull

    ws = variants["ws"]
    v = ws.resolve_version("en")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("x")
    with pytest.raises(StemmaError, match="not empty"):
        pull(ws, v, taken, "hf")
    assert [p.name for p in taken.iterdir()] == ["mine.txt"]
    blocker = tmp_path / "a-file"  # a directory cannot be made under a file (root ignores permissions)
    blocker.write_text("x")
    with pytest.raises(StemmaError, match="cannot write"):
        pull(ws, v, blocker / "sub" / "out", "hf")
    with pytest.raises(StemmaError, match="unknown format"):
        pull(ws, v, tmp_path / "x", "onnx")
    assert not (tmp_path / "x").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temp dirs


def test_tradeoff_marks_the_pareto_front_and_writes_a_png(variants, tmp_path):
    from stemma.tradeoff import Point, pareto, plot, tradeoff_points

    pts = [Point("a", "a", 10, 5.0, None), Point("b", "b", 5, 6.0, None), Point("c", "c", 12, 7.0, None)]
    assert [p.node for p in pareto(pts)] == ["a", "b"]
    assert [p.front_speed for p in pts] == [True, True, False]
    # The biggest, worst point is on the wider front once it is the fastest, and only then.
    pts = [Point("a", "a", 10, 5.0, 100.0), Point("b", "b", 5, 6.0, 100.0), Point("c", "c", 12, 7.0, 300.0)]
    assert [p.node for p in pareto(pts)] == ["a", "b"]
    assert [p.front_speed for p in pts] == [True, True, True]
    pts[2].tokens_per_s = 100.0
    pareto(pts)
    assert [p.front_speed for p in pts] == [True, True, False]
    ws = variants["ws"]
    pts = tradeoff_points(ws, SP)
    assert {p.label for p in pts} >= {"int8", "int4", "lowrank", "sparse", "slim"}
    smallest = min(pts, key=lambda p: p.bytes)
    assert smallest.front
    png = plot(pts, SP, tmp_path / "t.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_select_pull_auto_and_nothing_fits(variants, tmp_path):
    from typer.testing import CliRunner

    from stemma.cli import app

    r = CliRunner().invoke(app, ["select", "--language", "en", "--domain", "software/python", "--memory", "10GB"])
    assert r.exit_code == 0, r.output
    assert "choice:" in r.output
    r = CliRunner().invoke(app, ["select", "--language", "en", "--domain", "software/python", "--memory", "1MB"])
    assert r.exit_code != 0 and isinstance(r.exception, StemmaError) and "nothing fits" in str(r.exception)
    r = CliRunner().invoke(app, ["pull", "auto", "--language", "en", "--domain", "software/python", "--memory",
                                 "10GB", "--out", str(tmp_path / "auto"), "--format", "safetensors"])
    assert r.exit_code == 0, r.output
    assert "selected_because" in json.loads((tmp_path / "auto" / "stemma.json").read_text())


def _gguf_file_type(path) -> int:
    import gguf

    field = gguf.GGUFReader(str(path)).fields["general.file_type"]
    return int(field.parts[field.data[0]][0])


def test_footprints_per_runtime_and_selection_in_llamacpp(variants, tmp_path):
    """The int8 variant in llama.cpp needs a fraction of what a PyTorch process holds: a budget between the two
    picks a llama.cpp candidate and says so; a torch-only device finds nothing; pull auto writes that GGUF."""
    from typer.testing import CliRunner

    from stemma.cli import app
    from stemma.footprint import GGUF_FORMATS, stored_llamacpp
    from stemma.select import select_profile
    from stemma.serve.selector import NoModelError
    from stemma.serve.selector import select as serve_select

    ws = variants["ws"]
    int8, int4 = ws.resolve_version(f"{SP}/int8"), ws.resolve_version(f"{SP}/int4")
    names = {m.name for m in ws.metrics_of(int8.id)}
    assert {"footprint.rss_generate_bytes", "footprint.llamacpp.q8_0.rss_generate_bytes",
            "footprint.llamacpp.f16.disk_bytes", "footprint.llamacpp.f32.tokens_per_s"} <= names
    torch_fp, gg = stored(ws, int8.id), stored_llamacpp(ws, int8.id)
    assert set(gg) == set(GGUF_FORMATS)
    assert gg["q8_0"].disk_bytes < gg["f16"].disk_bytes < gg["f32"].disk_bytes
    assert all(0 < fp.rss_generate_bytes < torch_fp.rss_generate_bytes and fp.tokens_per_s > 0 for fp in gg.values())
    assert "no type holding stemma's int4" in stored_llamacpp(ws, int4.id)["q8_0"].note
    budget = (max(fp.rss_generate_bytes for fp in gg.values()) + torch_fp.rss_generate_bytes) // 2

    sel = select(ws, "en", "software/python", memory_bytes=budget)
    c = sel.require()
    assert c.runtime == "llamacpp" and c.fmt in GGUF_FORMATS and c.memory <= budget
    assert f"in llama.cpp as a {c.fmt} GGUF" in c.reason
    assert c.perplexity == min(x.perplexity for x in sel.ranked if x.fits)
    for x in sel.ranked:
        assert ("with stemma (PyTorch)" if x.runtime == "torch" else "in llama.cpp as a") in x.reason
        if x.runtime == "torch":
            assert not x.fits and "over the" in x.reason
        else:
            assert f"perplexity measured on the {x.fmt} GGUF in llama.cpp" in x.reason
    # llama.cpp's perplexity of the GGUFs, on the same windows: f32 holds the int8 variant's values, q8_0 its
    # precision (per block of 32 rather than per channel).
    own = {x.fmt: x.perplexity for x in sel.ranked if x.node == f"{SP}/int8"}
    assert abs(own["f32"] / own["stemma"] - 1) < 1e-3 and abs(own["q8_0"] / own["stemma"] - 1) < 1e-2
    ds = sel.dataset_id
    assert ws.get_metric(int8.id, "perplexity.llamacpp.q8_0", ds, "test") == own["q8_0"]

    # A profile written before runtimes were recorded means stemma (PyTorch) only: nothing fits that budget.
    p = tmp_path / "torch-only.json"
    p.write_text(json.dumps({"language": "en", "domain": "software/python", "memory_bytes": budget}))
    prof = Profile.load(p)
    assert prof.runtimes == ["torch"]
    only = select_profile(ws, prof)
    assert only.choice is None and {x.runtime for x in only.ranked} == {"torch"}
    assert "with stemma (PyTorch), which needs" in only.nothing_fits()
    with pytest.raises(NoModelError, match="nothing fits"):  # the server runs versions with stemma
        serve_select(ws, language="en", domain="python", memory_bytes=budget)
    r = CliRunner().invoke(app, ["select", "--profile", str(p)])
    assert r.exit_code != 0 and "nothing fits" in str(r.exception)
    p.write_text(json.dumps({"language": "en", "domain": "software/python", "memory_bytes": budget,
                             "runtimes": ["torch", "llamacpp"]}))
    r = CliRunner().invoke(app, ["select", "--profile", str(p)])
    assert r.exit_code == 0 and "llama.cpp" in r.output, r.output

    r = CliRunner().invoke(app, ["pull", "auto", "--language", "en", "--domain", "software/python", "--memory",
                                 f"{budget}B", "--out", str(tmp_path / "auto")])
    assert r.exit_code == 0, r.output
    lineage = json.loads((tmp_path / "auto" / "stemma.json").read_text())
    assert lineage["format"] == "gguf" and lineage["gguf_type"] == c.fmt and lineage["version"] == c.version.id
    assert "llama.cpp" in lineage["selected_because"]
    assert _gguf_file_type(tmp_path / "auto" / "model.gguf") == {"f32": 0, "f16": 1, "q8_0": 7}[c.fmt]
    # An explicit type narrows the llama.cpp formats considered.
    r = CliRunner().invoke(app, ["pull", "auto", "--language", "en", "--domain", "software/python", "--memory",
                                 f"{budget}B", "--out", str(tmp_path / "q8"), "--gguf-type", "q8_0"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q8" / "stemma.json").read_text())["gguf_type"] == "q8_0"
    assert _gguf_file_type(tmp_path / "q8" / "model.gguf") == 7
    # Without stored GGUF perplexities (and nothing measured), the version's own stands in and the reason says so.
    from sqlalchemy import delete

    from stemma.registry.tables import Metric

    with ws.db.session() as s:
        s.execute(delete(Metric).where(Metric.name.like("perplexity.llamacpp.%")))
    stale = select(ws, "en", "software/python", memory_bytes=budget, measure=False)
    assert stale.choice.runtime == "llamacpp"
    assert all("its perplexity is the version's own in stemma, not measured on the" in x.reason
               for x in stale.ranked if x.runtime == "llamacpp")
    r = CliRunner().invoke(app, ["profile", "--runtime", "tpu"])
    assert r.exit_code != 0 and "unknown runtime 'tpu'" in str(r.exception)
    r = CliRunner().invoke(app, ["profile", "--out", str(tmp_path / "me.json")])
    assert r.exit_code == 0, r.output
    assert Profile.load(tmp_path / "me.json").runtimes == ["torch", "llamacpp"]  # llama-cpp-python imports here
    r = CliRunner().invoke(app, ["profile", "--runtime", "llamacpp", "--out", str(tmp_path / "me.json")])
    assert Profile.load(tmp_path / "me.json").runtimes == ["llamacpp"]


def test_a_version_llamacpp_cannot_run_records_why_and_no_numbers(variants, monkeypatch):
    from sqlalchemy import delete

    from stemma import pull as pull_mod
    from stemma.footprint import ensure_llamacpp, stored_llamacpp
    from stemma.registry.tables import Metric

    ws = variants["ws"]
    v = ws.resolve_version(f"{SP}/lowrank")
    with ws.db.session() as s:
        s.execute(delete(Metric).where(Metric.version_id == v.id, Metric.name.like("footprint.llamacpp.%")))

    def refuse(*a, **k):
        raise StemmaError("GGUF export needs a byte-level BPE tokenizer with GPT-2's split")

    monkeypatch.setattr(pull_mod, "write_gguf_types", refuse)
    assert ensure_llamacpp(ws, v.id).startswith("GGUF export needs")
    assert stored_llamacpp(ws, v.id).startswith("GGUF export needs")
    rows = [m for m in ws.metrics_of(v.id) if m.name.startswith("footprint.llamacpp.")]
    assert [m.name for m in rows] == ["footprint.llamacpp.refused"]
    monkeypatch.undo()
    sel = select(ws, "en", "software/python")
    assert any(s.startswith(f"{SP}/lowrank") and "in llama.cpp: GGUF export needs" in s for s in sel.skipped)
    assert {c.runtime for c in sel.ranked if c.node == f"{SP}/lowrank"} == {"torch"}


def test_llamacpp_footprints_and_perplexities_come_from_one_write(variants, monkeypatch):
    """Measuring a version in llama.cpp writes its GGUF files once, for both the footprints and the perplexities;
    a device without torch never has the version's own perplexity measured."""
    from sqlalchemy import delete, or_

    from stemma import pull as pull_mod
    from stemma.evaluate.evaluator import Evaluator
    from stemma.footprint import GGUF_FORMATS
    from stemma.registry.tables import Metric

    ws = variants["ws"]
    v = ws.resolve_version(f"{SP}/int8")
    with ws.db.session() as s:
        s.execute(delete(Metric).where(Metric.version_id == v.id, or_(Metric.name.like("footprint.llamacpp.%"),
                                                                      Metric.name.like("perplexity%"))))
    writes, real = [], pull_mod.write_gguf_types

    def counted(ws_, version, dirpath, kinds=("f32",)):
        writes.append((version.id, tuple(kinds)))
        return real(ws_, version, dirpath, kinds)

    def no_torch(*a, **k):
        raise AssertionError("the version's own perplexity measured for a device without torch")

    monkeypatch.setattr(pull_mod, "write_gguf_types", counted)
    monkeypatch.setattr(Evaluator, "ppl", no_torch)
    sel = select(ws, "en", "software/python", runtimes=["llamacpp"])
    assert writes == [(v.id, GGUF_FORMATS)]
    mine = [c for c in sel.ranked if c.version.id == v.id]
    assert {c.fmt for c in mine} == set(GGUF_FORMATS) and not any(c.ppl_own for c in mine)
    assert all(ws.get_metric(v.id, f"perplexity.llamacpp.{f}", sel.dataset_id, "test") is not None
               for f in GGUF_FORMATS)
    assert ws.get_metric(v.id, "perplexity", sel.dataset_id, "test") is None
