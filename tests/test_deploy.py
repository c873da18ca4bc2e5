"""`stemma deploy vllm`: every written directory loads in plain transformers / peft with stemma's logits, and the
command names each adapter with vLLM's rank; bad input leaves nothing."""

import json
import shlex
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from stemma.deploy import deploy_vllm, vllm_max_rank
from stemma.errors import StemmaError


def test_deploy_writes_base_and_direct_lora_children_that_load_with_stemmas_logits(any_copy, tmp_path):
    """Both families; vLLM's GPT-2 takes no LoRA, which the deployment says."""
    from peft import PeftModel

    ws = any_copy["ws"]
    d = deploy_vllm(ws, "en", tmp_path / "vllm")
    out = tmp_path / "vllm"
    assert (d.warning is not None) == (any_copy["arch"] == "gpt2")
    assert (d.warning or "") in (out / "README.md").read_text()
    assert d.adapters == {"en/software": 8} and d.max_lora_rank == 8
    assert "stacked on the adapter en/software" in d.skipped["en/software/python"]
    assert "full weights" in d.skipped["en/legal"]
    ids = torch.randint(0, 500, (2, 24))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(out / "base")
        ours = ws.load_model(ws.resolve_version("en").id)(input_ids=ids).logits
        assert torch.allclose(base(input_ids=ids).logits, ours, atol=1e-4)
        assert (out / "base" / "tokenizer.json").is_file()
        for name in d.adapters:
            fresh = AutoModelForCausalLM.from_pretrained(out / "base")
            model = PeftModel.from_pretrained(fresh, out / "adapters" / name)
            child = ws.load_model(ws.resolve_version(name).id)(input_ids=ids).logits
            assert torch.allclose(model(input_ids=ids).logits, child, atol=1e-4)
            assert not torch.allclose(child, ours, atol=1e-4)
    cmd = d.command
    assert cmd[:3] == ["vllm", "serve", f"{out}/base"] and cmd[cmd.index("--served-model-name") + 1] == "en"
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-lora-rank") + 1] == "8"
    assert cmd[cmd.index("--max-loras") + 1] == "1"
    assert cmd[cmd.index("--lora-modules") + 1] == f"en/software={out}/adapters/en/software"
    meta = json.loads((out / "stemma.json").read_text())
    assert [a["version"] for a in meta["adapters"]] == [ws.resolve_version("en/software").id]
    assert shlex.join(cmd) in (out / "README.md").read_text()
    # serve.sh runs the same command from wherever the directory lies, passing on extra arguments
    moved = out.rename(tmp_path / "moved")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "vllm").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "bin" / "vllm").chmod(0o755)
    echoed = subprocess.run([moved / "serve.sh", "--port", "9"], capture_output=True, text=True, check=True,
                            env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"})
    assert echoed.stdout.split() == [a.replace(str(out), str(moved)) for a in cmd[1:]] + ["--port", "9"]


def test_deploy_of_a_base_without_direct_loras_serves_it_alone(llama_copy, tmp_path):
    d = deploy_vllm(llama_copy["ws"], "master", tmp_path / "m")
    assert d.adapters == {} and "--enable-lora" not in d.command and d.max_lora_rank is None
    assert "full weights" in d.skipped["en"]


def test_vllm_max_rank_rounds_up_to_a_value_vllm_accepts():
    assert [vllm_max_rank(r) for r in (1, 8, 9, 16, 33, 300, 512)] == [8, 8, 16, 16, 64, 320, 512]
    with pytest.raises(StemmaError, match="beyond vLLM"):
        vllm_max_rank(513)


def test_deploy_refuses_bad_input_in_one_line_and_writes_nothing(llama_copy, tmp_path):
    ws = llama_copy["ws"]
    tmp_path = tmp_path / "o"  # beside the copied tree
    tmp_path.mkdir()
    with pytest.raises(StemmaError, match="unknown node") as e:
        deploy_vllm(ws, "nope", tmp_path / "a")
    with pytest.raises(StemmaError, match="en/software is a LoRA adapter on en; deploy en instead") as e:
        deploy_vllm(ws, "en/software", tmp_path / "b")
    assert "\n" not in str(e.value)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(StemmaError, match="not empty"):
        deploy_vllm(ws, "en", taken)
    with pytest.raises(StemmaError, match="'=' or ','"):
        deploy_vllm(ws, "en", tmp_path / "a=b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


def test_cli_prints_the_command_and_refuses_an_adapter_in_one_line(llama_copy, capsys, monkeypatch, tmp_path):
    from tests.test_cli import run

    code, out, err = run(capsys, monkeypatch, "deploy", "vllm", "en/software", "--out", tmp_path / "x")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "deploy en instead" in err
    assert not (tmp_path / "x").exists()
    code, out, _ = run(capsys, monkeypatch, "deploy", "vllm", "en", "--out", tmp_path / "y")
    assert code == 0 and "not served: en/software/python" in out
    assert f"--lora-modules en/software={tmp_path}/y/adapters/en/software" in out
