"""`stemma update ...`: contributor keys, local training, submission, aggregation rounds, offers to siblings."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..settings import when
from .app import update_app
from .console import err, open_ws, out


def _ctx():
    return open_ws(), out, err


@update_app.command("keygen")
def keygen(path: Path = typer.Argument(..., help="Private key file to create (its public key goes to PATH.pub).")):
    """Create an ed25519 key pair for a contributor."""
    from ..update.keys import generate

    pub = generate(path)
    out.print(f"private key {path} (keep it), public key {path}.pub: {pub}", highlight=False)


@update_app.command("register")
def register(node: str = typer.Argument(..., help="Node the contributor may update."),
             name: str = typer.Option(..., "--name", help="Contributor name."),
             public_key: str = typer.Option(..., "--public-key", help="A .pub file or 64 hex characters.")):
    """Allow a contributor (by public key) to send updates to a node."""
    from ..update.service import register_contributor

    ws, out, _ = _ctx()
    p = Path(public_key)
    text = p.read_text() if p.is_file() else public_key
    row = register_contributor(ws, node, name, text)
    out.print(f"{row.name} may update {row.node_path} (key {row.public_key[:16]}…)", highlight=False)


@update_app.command("contributors")
def list_contributors(node: str = typer.Argument(None)):
    """Registered contributors (of one node, or all), with revoked keys and why."""
    from ..update.service import contributors

    ws, out, _ = _ctx()
    t = Table("node", "contributor", "public key", "status")
    for c in contributors(ws, node):
        status = "active" if c.revoked_at is None else (
            f"revoked {when(c.revoked_at)} by {c.revoked_by}: {c.revoked_reason}")
        t.add_row(c.node_path, c.name, c.public_key, status)
    out.print(t)


@update_app.command("revoke")
def revoke(contributor: str = typer.Argument(..., help="The contributor's registered name."),
           node: str = typer.Option(..., "--node", help="The node the key was registered for."),
           reason: str = typer.Option(..., "--reason", help="Why (recorded with who and when).")):
    """Revoke a contributor's key: its updates are refused from now on, and rounds leave out its pending ones."""
    from ..update.service import revoke as run

    ws, out, _ = _ctx()
    row = run(ws, node, contributor, reason)
    out.print(f"revoked {row.name}'s key for {row.node_path} ({row.public_key[:16]}…): {row.revoked_reason}",
              highlight=False)


@update_app.command("train")
def train(node: str = typer.Argument(..., help="node or node@version to train against."),
          data: Path = typer.Option(..., "--data", help="Local corpus: text file, directory or JSONL."),
          key: Path = typer.Option(..., "--key", help="The contributor's private key."),
          contributor: str = typer.Option(..., "--contributor", help="The contributor's registered name."),
          out_file: Path = typer.Option(..., "--out", help="Update file to write."),
          kind: str = typer.Option("lora", "--kind", help="lora or full."),
          steps: int = typer.Option(60, "--steps"),
          lr: float = typer.Option(2e-3, "--lr"),
          seed: int = typer.Option(0, "--seed"),
          share_heldout: bool = typer.Option(True, "--share-heldout/--no-share-heldout",
                                             help="Send held-out token ids for the parent's gate.")):
    """Train an update on local data and sign it; the data stays here."""
    from ..errors import StemmaError
    from ..progress import RichReporter
    from ..update.local import LocalTrainConfig, make_update

    ws, out, err = _ctx()
    if kind not in ("lora", "full"):
        raise StemmaError("--kind is lora or full")
    cfg = LocalTrainConfig(kind=kind, steps=steps, lr=lr, seed=seed, share_heldout=share_heldout)
    path, header = make_update(ws, node, data, key, contributor, out_file, cfg, RichReporter(err))
    out.print(f"wrote {path}: {header['kind']} update of {header['node']}@{header['parent'][:12]} "
              f"by {header['contributor']}, {header['n_examples']} documents", highlight=False)


@update_app.command("submit")
def submit(files: list[Path] = typer.Argument(..., help="Signed update files.")):
    """Verify and store updates (a refused update is stored nowhere)."""
    from ..errors import StemmaError
    from ..update.service import submit as do_submit

    ws, out, _ = _ctx()
    for f in files:
        if not f.is_file():
            raise StemmaError(f"{f}: no such file")
        row = do_submit(ws, f.read_bytes(), str(f))
        out.print(f"accepted for aggregation: {f} -> update {row.id[:12]} of {row.node_path}", highlight=False)


@update_app.command("list")
def list_updates(node: str = typer.Argument(...)):
    """Updates submitted to a node."""
    from ..update.service import contributors, updates

    ws, out, _ = _ctx()
    names = {c.id: c.name for c in contributors(ws, node)}
    t = Table("update", "contributor", "against", "kind", "documents", "status")
    for u in updates(ws, node):
        t.add_row(u.id[:12], names.get(u.contributor_id, "?"), u.parent_id[:12], u.kind, str(u.n_examples), u.status)
    out.print(t)


def _print_round(out, res) -> None:
    r = res.round
    verdict = "[green]accepted[/green]" if r.accepted else "[red]rejected[/red]"
    out.print(f"round {r.id[:12]} on {r.node_path}@{r.parent_id[:12]}: {r.strategy} over {len(r.update_ids)} "
              f"update(s), {len(r.selected)} kept: {verdict}")
    for reason in r.reasons:
        out.print(f"  - {reason}", highlight=False)
    if res.version is not None:
        out.print(f"new version {r.node_path}@{res.version.short} (relation update); descendants are now stale")


@update_app.command("aggregate")
def aggregate(node: str = typer.Argument(...),
              strategy: str = typer.Option(None, "--strategy", help="Override the node's gate strategy."),
              strategy_config: str = typer.Option(None, "--strategy-config", help="JSON settings for the strategy.")):
    """Aggregate the node's pending updates, judge the result with its gate, register it if accepted."""
    from ..errors import StemmaError
    from ..progress import RichReporter
    from ..update.service import aggregate as run

    ws, out, err = _ctx()
    try:
        params = json.loads(strategy_config) if strategy_config else None
    except json.JSONDecodeError:
        raise StemmaError("--strategy-config is not valid JSON") from None
    res = run(ws, node, RichReporter(err), strategy=strategy, strategy_config=params)
    _print_round(out, res)
    if not res.round.accepted:
        raise typer.Exit(2)


@update_app.command("rounds")
def list_rounds(node: str = typer.Argument(None)):
    """Aggregation rounds with their verdicts and reasons."""
    from ..update.service import rounds

    ws, out, _ = _ctx()
    for r in rounds(ws, node):
        verdict = "accepted" if r.accepted else "rejected"
        src = f" (offered from round {r.source_round[:12]})" if r.source_round else ""
        out.print(f"{r.id[:12]} {r.node_path}@{r.parent_id[:12]} {r.strategy} {verdict}{src}: "
                  + "; ".join(r.reasons), highlight=False)


@update_app.command("offer")
def offer(round_id: str = typer.Argument(..., help="An accepted round."),
          to: str = typer.Option(..., "--to", help="A sibling node of the round's node.")):
    """Offer an accepted aggregate to a sibling node, under the sibling's gate."""
    from ..progress import RichReporter
    from ..update.service import offer as run

    ws, out, err = _ctx()
    res = run(ws, round_id, to, RichReporter(err))
    _print_round(out, res)
    if not res.round.accepted:
        raise typer.Exit(2)


@update_app.command("federated-server")
def federated_server(node: str = typer.Argument(...),
                     address: str = typer.Option("127.0.0.1:8088", "--address", help="host:port to listen on."),
                     clients: int = typer.Option(..., "--clients", help="Contributors the round waits for."),
                     timeout: float = typer.Option(600, "--timeout", help="Seconds to wait for contributors."),
                     result: Path = typer.Option(None, "--result", help="Write the round's outcome here (JSON).")):
    """Run one federated round for a node over Flower; contributors join with `federated-client`."""
    from ..errors import StemmaError
    from ..progress import RichReporter
    from ..update.federated import run_server

    _, out, err = _ctx()
    if clients < 1:
        raise StemmaError("--clients must be >= 1")
    res = run_server(node, address, clients, result, timeout, RichReporter(err))
    verdict = "[green]accepted[/green]" if res.accepted else "[red]rejected[/red]"
    out.print(f"federated round on {node}: {len(res.contributors)} verified update(s), {len(res.refused)} refused: "
              f"{verdict}")
    for r in res.reasons:
        out.print(f"  - {r}", highlight=False)
    if not res.accepted:
        raise typer.Exit(2)


@update_app.command("federated-client")
def federated_client(address: str = typer.Option(..., "--server", help="host:port of the round's server."),
                     data: Path = typer.Option(..., "--data", help="Local corpus: text file, directory or JSONL."),
                     key: Path = typer.Option(..., "--key", help="The contributor's private key."),
                     contributor: str = typer.Option(..., "--contributor", help="The contributor's registered name."),
                     kind: str = typer.Option("lora", "--kind"),
                     steps: int = typer.Option(60, "--steps"),
                     lr: float = typer.Option(2e-3, "--lr"),
                     seed: int = typer.Option(0, "--seed")):
    """Join a federated round: train on local data, send only the signed update."""
    from ..errors import StemmaError
    from ..update.federated import run_client
    from ..update.local import LocalTrainConfig

    if kind not in ("lora", "full"):
        raise StemmaError("--kind is lora or full")
    run_client(address, data, key, contributor, LocalTrainConfig(kind=kind, steps=steps, lr=lr, seed=seed))
