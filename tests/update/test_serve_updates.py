"""Updates through the server's admin API, and the updated version served at once: its greedy output equals
Hugging Face `generate` on the updated model (an adapter whose rank grew by the aggregate)."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from stemma.serve.api import create_app
from stemma.serve.config import ServeConfig
from stemma.update import bundle, keys, service

from .test_updates import FAST, _local_data, _set_gate

TOKEN = "update-admin"


def test_submit_and_aggregate_over_admin_then_serve_the_new_version(tree_copy, tmp_path):
    from stemma.update.local import make_update

    ws = tree_copy["ws"]
    node = "en/software"
    _set_gate(tree_copy, node, {"strategy": "fedavg", "min_contributors": 2, "max_own_rise": 0.5,
                                "max_child_rise": 0.5})
    files = []
    for i in range(2):
        k = tmp_path / f"k{i}"
        service.register_contributor(ws, node, f"c{i}", keys.generate(k))
        files.append(make_update(ws, node, _local_data(tmp_path, i), k, f"c{i}", tmp_path / f"u{i}", FAST)[0])
    auth = {"Authorization": f"Bearer {TOKEN}"}
    app = create_app(ws, ServeConfig(admin_token=TOKEN, max_batch=8))
    with TestClient(app) as client:
        prompt = "The ls command lists"
        before = client.post("/v1/completions", json={"model": node, "prompt": prompt, "max_tokens": 12,
                                                      "temperature": 0}).json()["choices"][0]["text"]
        assert client.post("/admin/updates", content=files[0].read_bytes()).status_code == 401
        upd = bundle.read(files[0])
        unsigned = bundle.encode(upd.header, upd.delta, upd.heldout, None)
        r = client.post("/admin/updates", content=unsigned, headers=auth)
        assert r.status_code == 400 and "not signed" in r.json()["error"]["message"]
        assert service.updates(ws, node) == []
        for f in files:
            r = client.post("/admin/updates", content=f.read_bytes(), headers=auth)
            assert r.status_code == 200, r.text
            assert r.json()["node"] == node and r.json()["status"] == "pending"
        r = client.post("/admin/aggregate", json={"node": node}, headers=auth)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["accepted"], body["reasons"]
        new = ws.version(body["version"])
        assert new.row.relation == "update"
        models = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        assert models[node]["version"] == new.id
        after = client.post("/v1/completions", json={"model": node, "prompt": prompt, "max_tokens": 12,
                                                     "temperature": 0}).json()["choices"][0]["text"]
        tok = ws.tokenizer(new.row.tokenizer)
        ids = tok.encode(prompt).ids
        want = ws.load_model(new.id).generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                              pad_token_id=0)[0, len(ids):].tolist()
        assert after == tok.decode(want)
        assert isinstance(before, str)
        r = client.post("/admin/aggregate", json={"node": node}, headers=auth)
        assert r.status_code == 400 and "no pending updates" in r.json()["error"]["message"]
