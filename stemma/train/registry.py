"""The registry of build methods and what a method receives and returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import SpecError, StemmaError
from ..plugins import Registry
from ..progress import NullReporter, Reporter
from .parallel import ONE, World

_METHODS: Registry[type[BuildMethod]] = Registry("build method", lambda cls: cls.name, SpecError)
register, names = _METHODS.register, _METHODS.names


def get(name: str) -> BuildMethod:
    """A registered method by name (`stemma.methods` imports the built-in ones)."""
    return _METHODS.get(name)()


@dataclass
class BuildContext:
    """What a method may use: the workspace, its parent, its data, a work dir for checkpoints, a reporter, and the
    processes it trains with (``world``: one, unless the method is `BuildMethod.data_parallel` and the build runs in
    several). A method run by a rank other than 0 computes only: its output is discarded, it writes nothing."""

    ws: Any  # Workspace; typed loosely to keep this module import-light
    node: str
    spec_dir: Path
    parent: Any | None  # VersionInfo of the parent version
    dataset_id: str | None
    replay_dataset_id: str | None
    work_dir: Path
    reporter: Reporter = field(default_factory=NullReporter)
    world: World = ONE

    def texts(self, split: str = "train", dataset_id: str | None = None) -> tuple[str, ...]:
        ds = dataset_id or self.dataset_id
        if ds is None:
            raise StemmaError(f"node {self.node}: this method needs a dataset")
        return self.ws.dataset_texts(ds, split)

    def streams(self, tok, context: int, seed: int):
        """Token streams of the node's training data and, if the parent has one, of the parent's (for replay)."""
        from .base import TokenStream

        own = TokenStream.from_texts(tok, self.texts("train"), context, seed, name=f"dataset of {self.node}")
        replay = None
        if self.replay_dataset_id:
            replay = TokenStream.from_texts(tok, self.texts("train", self.replay_dataset_id), context, seed,
                                            name=f"parent dataset of {self.node}")
        return own, replay

    def parent_tokenizer(self):
        return self.ws.tokenizer(self.parent.row.tokenizer)

    def load_parent(self):
        return self.ws.load_model(self.parent.id)


@dataclass
class BuildOutput:
    """A method's result: files for the store plus facts for the manifest."""

    files: dict[str, bytes]
    tokenizer: str
    """Digest of the tokenizer blob the version uses."""
    params: int
    own_params: int
    architecture: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)
    """Training statistics (steps, tokens, seconds, final loss) for the manifest."""
    metrics: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)
    """Scores the method measured on a held-out share of its own inputs (e.g. ``pref/accuracy``): name ->
    (value, details), stored as metrics of the new version with split ``heldout`` and no dataset."""
    scan: dict[str, Any] | None = None
    """The scan of files taken from outside (`stemma.scan.ScanReport.record`), kept in the manifest as ``scan``."""


@dataclass(frozen=True)
class Planned:
    """What a node's build will produce, known from the spec alone (pre-flight): nothing trained, nothing loaded."""

    config: Any | None
    """The Hugging Face config of the model its version loads as (None: not knowable before building)."""
    kind: str = "full"
    """``full`` (plain weights), ``adapter`` (a delta on the parent) or ``variant`` (compressed storage, which
    nothing can train an adapter on)."""


def meta_params(config) -> int:
    """Parameters of a model of ``config``, counted on the ``meta`` device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..models.arch import count_params

    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(config))


class BuildMethod:
    name: ClassVar[str]
    relation: ClassVar[str]
    """Hugging Face ``base_model_relation`` word where one exists."""
    config_cls: ClassVar[type]
    root: ClassVar[bool] = False
    """True for methods that start a tree (no parent)."""
    needs_dataset: ClassVar[bool] = True
    data_parallel: ClassVar[bool] = False
    """True for methods that train with `BuildContext.world` (`stemma.train.parallel`): each process computes its
    `World.share` of every batch through the `World.wrap` wrapper of the trained model. Others run in rank 0 alone."""

    def make_config(self, raw: dict[str, Any] | None, where: str) -> Any:
        """Validate a config mapping against the method's dataclass (types and unknown fields)."""
        from ..configs import parse_dataclass
        from .base import resolve_precision

        cfg = parse_dataclass(self.config_cls, raw, f"{where} (method {self.name})")
        if getattr(cfg, "precision", None) == "auto":  # the recipe names the precision that trains
            cfg = dataclasses.replace(cfg, precision=resolve_precision("auto"))
        return cfg

    def batch_parts(self, cfg: Any) -> dict[str, int]:
        """The rows of one step's global batch by part (own data, replay): data-parallel training shares each part
        out evenly, so each must be a multiple of the number of processes. Default: the forgetting control's split,
        replay assumed present (it is whenever the parent has training data)."""
        from .forgetting import split_batch

        split = split_batch(cfg.batch_size, getattr(cfg, "replay_fraction", 0.0), True)
        return {"own": split.own, "replay": split.replay}

    def recipe_config(self, cfg: Any) -> dict[str, Any]:
        """The config as it enters the recipe key (everything, unless a field only locates an input)."""
        return dataclasses.asdict(cfg)

    def relation_for(self, cfg: Any) -> str:
        """The relation of the versions this config builds (methods that train an adapter or all weights by config
        say which)."""
        return self.relation

    def can_rebase(self, cfg: Any) -> bool:
        """Whether a version can follow a parent update by `stemma.update.rebase` (re-fitting on the node's text)."""
        return self.relation_for(cfg) == "adapter"

    def recipe_inputs(self, cfg: Any, spec_dir: Path) -> dict[str, Any]:
        """Extra content that identifies the build beyond config, parent and data (e.g. checkpoint hashes)."""
        return {}

    def plan(self, cfg: Any, parent: Planned | None, spec: Any, node: Any) -> Planned:
        """Pre-flight: what this config builds from ``parent`` (the parent's own plan), or a `SpecError` of one line
        for what cannot build (checked before any dataset is curated or any node trained). ``spec`` is the
        `TreeSpec`, ``node`` the `NodeSpec`. Default: the parent's architecture, kept, as a delta or whole; an adapter
        is refused on a compressed variant (its layers are no plain linear layers to adapt)."""
        kind = "adapter" if self.relation_for(cfg) == "adapter" else "full"
        if kind == "adapter" and parent is not None and parent.kind == "variant":
            raise SpecError(f"node {node.path}: an adapter cannot be trained on the compressed variant {node.parent}; "
                            "give it a full-weight parent")
        return Planned(parent.config if parent is not None else None, kind)

    def run(self, ctx: BuildContext, cfg: Any) -> BuildOutput:
        raise NotImplementedError
