"""``train_masks``: learn N:M masks end to end on the shared training loop (:mod:`semisparse.train`).

The loss is the task loss (causal-LM cross-entropy, or distillation from the dense model:
logit KL or last-hidden-state MSE) minus the sparse-weight regulariser
``lambda * (1 - t/T) * sum ||W * soft_mask||^2`` (MaskLLM, Eq. 8), with ``tau``/``kappa``
annealed by :class:`~semisparse.maskllm.schedule.Schedule`. AdamW on the logits (lr 5e-4,
cosine to 5e-6, weight decay 0.1, betas (0.9, 0.95), clip 1.0). The noise of micro-batch
``g = (step * grad_accum + micro) * world_size + rank`` uses ``offset = g``, so a resumed
run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import train as _train
from ..pruning.patterns import parse_pattern
from ..train.outputs import is_causal_lm, logit_kl, logits_of
from .model import add_masks, changed_fraction, mask_layers, masks_disabled, sampling_state
from .schedule import SCHEDULES, Schedule

__all__ = ["MaskLLMConfig", "MaskLLMResult", "train_masks", "PRIORS", "LOSSES", "memory_per_weight"]

PRIORS = ("magnitude", "wanda", "sparsegpt")
LOSSES = ("auto", "lm", "kl", "mse")
_LOGIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class MaskLLMConfig:
    """Everything :func:`train_masks` does. Defaults follow the MaskLLM paper."""

    pattern: str = "2:4"
    steps: int = 200
    batch_size: int = 8               # sequences per micro-batch (per rank)
    grad_accum: int = 1
    lr: float = 5e-4
    min_lr: float = 5e-6
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float | None = 1.0
    tau: tuple = (4.0, 0.05)           # start, end
    kappa: tuple = (100.0, 500.0)      # start, end
    schedule: str = "linear"           # tau/kappa schedule: linear | exp | cosine | constant
    prior: object = "sparsegpt"        # None | "magnitude" | "wanda" | "sparsegpt" | {name: mask} | path to a masks file
    prior_strength: float = 3.0        # alpha
    prior_nsamples: int = 64           # calibration sequences for a wanda/sparsegpt prior (from the training data)
    prior_options: dict = field(default_factory=dict)  # passed to semisparse.prune (e.g. damp, blocksize)
    init_std: float = 0.01
    reg_lambda: float = 1e-5           # sparse-weight regulariser, decays linearly to 0
    loss: str = "auto"                 # auto | lm | kl | mse
    train_weights: bool = False
    logits_dtype: str = "float32"      # "bfloat16": half the logits' and Adam states' memory
    targets: object = None             # layer name patterns (default: every Linear in the repeated blocks)
    exclude: object = None
    seed: int = 0
    autocast: str = "auto"
    eval_every: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    metrics_path: str | None = None
    progress: bool = True
    distributed: str = "auto"

    def __post_init__(self):
        p = parse_pattern(self.pattern)
        if not p.structured or not 1 <= p.n < p.m <= 8:
            raise ValueError(f"MaskLLMConfig: pattern must be N:M with 1 <= N < M <= 8, got {self.pattern!r}")
        for name in ("steps", "batch_size", "grad_accum", "prior_nsamples"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MaskLLMConfig: {name} must be an integer >= 1, got {v!r}")
        for name in ("tau", "kappa"):
            v = getattr(self, name)
            if (
                not isinstance(v, (tuple, list)) or len(v) != 2
                or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v)
            ):
                raise ValueError(f"MaskLLMConfig: {name} must be (start, end) numbers, got {v!r}")
            setattr(self, name, (float(v[0]), float(v[1])))
        if min(self.tau) <= 0:
            raise ValueError(f"MaskLLMConfig: tau must stay > 0, got {self.tau}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"MaskLLMConfig: schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"MaskLLMConfig: loss must be one of {LOSSES}, got {self.loss!r}")
        if self.logits_dtype not in _LOGIT_DTYPES:
            raise ValueError(f"MaskLLMConfig: logits_dtype must be one of {tuple(_LOGIT_DTYPES)}, got {self.logits_dtype!r}")
        if isinstance(self.prior, str) and self.prior not in PRIORS and not os.path.exists(self.prior):
            raise ValueError(
                f"MaskLLMConfig: prior must be None, one of {PRIORS}, a {{layer: mask}} dict or an existing masks file, "
                f"got {self.prior!r}"
            )
        for name in ("prior_strength", "init_std", "reg_lambda"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"MaskLLMConfig: {name} must be a finite number >= 0, got {v!r}")
        if self.init_std <= 0:
            raise ValueError(f"MaskLLMConfig: init_std must be > 0, got {self.init_std}")
        if not isinstance(self.prior_options, Mapping) or "update" in self.prior_options:
            raise ValueError(
                f"MaskLLMConfig: prior_options must be a dict of semisparse.prune options other than 'update' "
                f"(the prior never changes a weight), got {self.prior_options!r}"
            )
        if min(self.kappa) <= 0:
            raise ValueError(f"MaskLLMConfig: kappa must stay > 0, got {self.kappa}")
        Schedule(self.tau[0], self.tau[1], self.steps, self.schedule)
        Schedule(self.kappa[0], self.kappa[1], self.steps, self.schedule)
        try:  # the loop's own fields (lr, min_lr, ...): fail now, before the model is touched
            self.train_config()
        except ValueError as e:
            raise ValueError(str(e).replace("TrainConfig", "MaskLLMConfig")) from None

    @property
    def nm(self) -> tuple[int, int]:
        p = parse_pattern(self.pattern)
        return p.n, p.m

    def train_config(self) -> "_train.TrainConfig":
        return _train.TrainConfig(
            steps=self.steps, lr=self.lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps, schedule="cosine",
            weight_decay=self.weight_decay, betas=tuple(self.betas), grad_clip=self.grad_clip,
            grad_accum=self.grad_accum, autocast=self.autocast, seed=self.seed, eval_every=self.eval_every,
            checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every,
            metrics_path=self.metrics_path, progress=self.progress, desc="maskllm", distributed=self.distributed,
        )


def memory_per_weight(pattern: str = "2:4", logits_dtype: str = "float32", optimizer_states: int = 2) -> dict[str, float]:
    """Training bytes per sparsified weight: logits, their gradient and the optimizer states
    (AdamW keeps two, in the logits' dtype). 2:4 fp32: 6 + 6 + 12 = 24 bytes per weight."""
    p = parse_pattern(pattern)
    per = math.comb(p.m, p.n) / p.m  # logits per weight
    b = torch.finfo(_LOGIT_DTYPES[logits_dtype]).bits // 8
    out = {"logits": per * b, "grad": per * b, "optimizer": optimizer_states * per * b}
    out["total"] = sum(out.values())
    return out


@dataclass
class MaskLLMResult:
    masks: dict                 # {layer: bool mask}, the final (argmax) masks
    prior: dict | None          # the prior masks used (None without a prior)
    changed: dict               # {layer: fraction of groups whose pattern differs from the prior}
    history: list = field(default_factory=list)
    last_eval: dict | None = None
    steps: int = 0
    resumed_from: int | None = None


# --------------------------------------------------------------------- data
def _batches(data, batch_size: int):
    """Token ids ``[n, seqlen]`` -> a list of ``{"input_ids": [batch_size, seqlen]}`` batches;
    a sequence of batches or a callable passes through."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"train_masks: data must be token ids [n, seqlen] (int64), got {data.dtype} {tuple(data.shape)}")
        if data.shape[0] < batch_size:
            raise ValueError(f"train_masks: data has {data.shape[0]} sequences, fewer than batch_size={batch_size}")
        nb = data.shape[0] // batch_size
        return [{"input_ids": data[i * batch_size : (i + 1) * batch_size].long()} for i in range(nb)]
    if callable(data) or hasattr(data, "__getitem__"):
        return data
    raise ValueError(f"train_masks: data must be token ids [n, seqlen], a sequence of batches or a callable, got {type(data).__name__}")


def _calib_from(data, nsamples: int):
    if isinstance(data, torch.Tensor):
        return data[:nsamples].long()
    if not hasattr(data, "__len__"):
        raise ValueError("train_masks: a Wanda/SparseGPT prior with callable data needs calib= (token ids [n, seqlen])")
    rows = []
    for i in range(min(len(data), nsamples)):
        b = data[i]
        ids = b["input_ids"] if isinstance(b, Mapping) else b
        rows.extend(ids.reshape(-1, ids.shape[-1]))
        if len(rows) >= nsamples:
            break
    return torch.stack(rows[:nsamples])


def _seqlen_of(batches) -> int:
    if isinstance(batches, (list, tuple)) and batches:
        b = batches[0]
        ids = b.get("input_ids") if isinstance(b, Mapping) else b
        if isinstance(ids, torch.Tensor) and ids.dim() >= 1 and ids.shape[-1] >= 2:
            return int(ids.shape[-1])
    raise ValueError("train_masks: pass eval_seqlen= (the evaluation window) with this form of data")


def _inputs(batch):
    if isinstance(batch, Mapping):
        return dict(batch)
    return {"input_ids": batch}


# --------------------------------------------------------------------- losses
def _resolve_loss(model: nn.Module, loss: str) -> str:
    if loss != "auto":
        return loss
    if is_causal_lm(model):
        return "lm"
    get = getattr(model, "get_output_embeddings", None)
    if callable(get) and get() is not None:
        return "kl"
    return "mse"


def _logits_of(out):
    return logits_of(out, "train_masks", "use loss='mse' (hidden-state distillation)")


def _hidden_of(model, inputs):
    out = model(**inputs, output_hidden_states=True)
    h = getattr(out, "last_hidden_state", None)
    if h is None:
        hs = getattr(out, "hidden_states", None)
        if hs is None:
            if isinstance(out, torch.Tensor):
                return out
            raise ValueError("train_masks: loss='mse' needs the model to return last_hidden_state or hidden_states")
        h = hs[-1]
    return h


def _call_error(model, e: TypeError) -> ValueError:
    return ValueError(
        f"train_masks: calling {type(_unwrap(model)).__name__} with Hugging Face style inputs failed ({e}); "
        "for other models pass task_loss=fn(model, batch) -> loss"
    )


def _task_loss(kind: str, model, inputs) -> torch.Tensor:
    try:
        return _builtin_task_loss(kind, model, inputs)
    except TypeError as e:
        if "argument" in str(e):
            raise _call_error(model, e) from e
        raise


def _builtin_task_loss(kind: str, model, inputs) -> torch.Tensor:
    if kind == "lm":
        labels = inputs.pop("labels", None)
        if labels is None:
            labels = inputs["input_ids"]
        out = model(**inputs, labels=labels)
        loss = getattr(out, "loss", None)
        if loss is None:  # compute it ourselves: next-token cross-entropy
            lg = _logits_of(out)
            loss = F.cross_entropy(lg[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return loss
    inputs.pop("labels", None)  # distillation: the dense model's outputs are the targets
    if kind == "kl":
        with _teacher(model):
            t = _logits_of(model(**inputs)).float()
        s = _logits_of(model(**inputs)).float()
        return logit_kl(s, t, where="train_masks")
    # mse on the last hidden state
    with _teacher(model):
        t = _hidden_of(model, inputs).float()
    s = _hidden_of(model, inputs).float()
    return F.mse_loss(s, t)


def _unwrap(model):
    return getattr(model, "module", model)


@contextlib.contextmanager
def _teacher(model):
    """The dense model as the teacher: dense weights, eval mode (no dropout), no grad."""
    inner = _unwrap(model)
    modes = {m: m.training for m in inner.modules()}
    inner.eval()
    try:
        with torch.no_grad(), masks_disabled(inner):
            yield
    finally:
        for m, mode in modes.items():
            m.training = mode


# --------------------------------------------------------------------- prior
def _compute_prior(model, cfg: MaskLLMConfig, data, calib, log) -> dict | None:
    prior = cfg.prior
    if prior is None:
        return None
    if isinstance(prior, Mapping):
        return {k: torch.as_tensor(v).bool() for k, v in prior.items()}
    if isinstance(prior, (str, os.PathLike)) and os.path.exists(prior):
        return _load_any_masks(prior)
    from ..pruning import prune

    # one-shot masks with the weights left as they are (SparseGPT without its update)
    if calib is None and prior != "magnitude":
        calib = _calib_from(data, cfg.prior_nsamples)
    # prune() zeroes the pruned weights in place: keep the Linear weights (on the CPU) and put
    # them back, so the prior is a mask only and the model stays dense
    from ..pruning.calibration import is_prunable

    saved = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if is_prunable(mod) and isinstance(w, torch.Tensor) and id(w) not in saved:
            saved[id(w)] = (w, w.detach().to("cpu", copy=True))
    opts = {**cfg.prior_options, **({"update": False} if prior == "sparsegpt" else {})}
    try:
        masks = prune(model, prior, pattern=cfg.pattern, calib=calib, targets=cfg.targets, exclude=cfg.exclude, **opts)
    finally:
        with torch.no_grad():
            for w, copy_ in saved.values():
                w.copy_(copy_)
    log(f"maskllm: prior from {prior} ({len(masks)} layers)")
    return masks


def _load_any_masks(path) -> dict:
    from ..io import load_tensors
    from ..masks import load_masks
    from .model import TASK_MASKS_FORMAT, unpack_masks

    tensors, header = load_tensors(path)
    if header.get("format") == TASK_MASKS_FORMAT:
        return unpack_masks(tensors, header)
    return load_masks(path)[0]


# --------------------------------------------------------------------- train
def train_masks(
    model: nn.Module,
    data,
    config: MaskLLMConfig | None = None,
    *,
    calib=None,
    eval_fn: Callable | None = None,
    eval_data: torch.Tensor | None = None,
    eval_seqlen: int | None = None,
    callbacks=(),
    task_loss: Callable | None = None,
    log=print,
) -> MaskLLMResult:
    """Learn ``config.pattern`` masks for ``model``'s Linear layers (in place: the layers
    become :class:`~semisparse.maskllm.MaskLLMLinear`; call :func:`~semisparse.maskllm.export`
    to compress them afterwards).

    ``data``: token ids ``[n, seqlen]`` (cut into micro-batches of ``batch_size``), a
    sequence of batches (dicts of model inputs, or id tensors) or a callable
    ``index -> batch``. ``calib``: calibration ids for a Wanda/SparseGPT prior (default: the
    first ``prior_nsamples`` sequences of ``data``). ``eval_data``: held-out token ids;
    perplexity with the argmax masks is logged at ``eval_every`` and at the end
    (``eval_fn(model, step) -> dict`` adds your own metrics; it runs in eval mode, i.e. with
    the argmax masks). ``task_loss(model, batch) -> loss`` replaces the built-in losses
    (which call the model Hugging Face style: ``model(input_ids=..., labels=...)``) for
    any other model; the regulariser is added to it.

    Resuming (``checkpoint_dir`` with a checkpoint) requires the same MaskLLM settings and
    the same data as the interrupted run: they are stored in the checkpoint and compared.
    """
    cfg = config or MaskLLMConfig()
    _, m = cfg.nm
    batches = _batches(data, cfg.batch_size)
    layers = mask_layers(model)
    prior = None
    if not layers:
        # (recomputed on resume too: the prior is deterministic and the report compares with it)
        prior = _compute_prior(model, cfg, batches if calib is None else None, calib, log)
        skipped = add_masks(
            model, cfg.pattern, prior=prior, alpha=cfg.prior_strength, init_std=cfg.init_std, targets=cfg.targets,
            exclude=cfg.exclude, train_weights=cfg.train_weights, logits_dtype=_LOGIT_DTYPES[cfg.logits_dtype],
            seed=cfg.seed, strict_prior=prior is not None,
        )
        for k, why in skipped.items():
            log(f"maskllm: left dense {k}: {why}")
        layers = mask_layers(model)
    state = sampling_state(model)
    kind = _resolve_loss(model, cfg.loss)
    tau = Schedule(cfg.tau[0], cfg.tau[1], cfg.steps, cfg.schedule)
    kappa = Schedule(cfg.kappa[0], cfg.kappa[1], cfg.steps, cfg.schedule)
    reg_on = cfg.reg_lambda > 0

    def loss_fn(mdl, batch, info):
        state.tau, state.kappa = tau(info.step), kappa(info.step)
        state.offset = (info.step * info.grad_accum + info.micro) * info.world_size + info.rank
        state.collect_reg = reg_on
        state.reg_terms.clear()
        try:
            task = task_loss(mdl, batch) if task_loss is not None else _task_loss(kind, mdl, _inputs(batch))
            metrics = {"task_loss": float(task.detach()), "tau": state.tau, "kappa": state.kappa}
            loss = task
            if reg_on and state.reg_terms:
                reg = torch.stack(state.reg_terms).sum()
                lam = cfg.reg_lambda * (1.0 - info.step / info.steps)
                loss = task - lam * reg
                metrics["reg"] = float(reg.detach())
            return loss, metrics
        finally:
            state.collect_reg = False
            state.reg_terms.clear()

    evals = []
    if eval_data is not None:
        from ..eval import perplexity

        seqlen = eval_seqlen or _seqlen_of(batches)

        def ppl_eval(mdl, step):
            return {"ppl": perplexity(mdl, eval_data, seqlen=seqlen, progress=False)}

        evals.append(ppl_eval)
    if eval_fn is not None:
        evals.append(eval_fn)

    def all_evals(mdl, step):
        out = {}
        for f in evals:
            out.update(f(mdl, step))
        return out

    params = [mod.logits for mod in layers.values()]
    if cfg.train_weights:
        params += [p for mod in layers.values() for p in (mod.weight, mod.bias) if p is not None]
    # the masks are read after training: under FSDP2 that needs the process group alive
    # (train() destroys a group it created), so own it here when nobody else does
    own_group = False
    if _wants_distributed(cfg.distributed) and not torch.distributed.is_initialized():
        backend = "nccl" if next(model.parameters()).is_cuda else "gloo"
        torch.distributed.init_process_group(backend)
        own_group = True
    try:
        result = _train.train(
            model, batches, loss_fn, cfg.train_config(), params=params, eval_fn=all_evals if evals else None,
            callbacks=callbacks, extra_state=_RunIdentity(cfg, batches, prior),
        )
        model = result.model
        model.eval()
        masks = _final_masks(model)
        if own_group:
            torch.distributed.barrier()  # no rank tears the group down while another still gathers
    finally:
        if own_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    changed = changed_fraction(masks, prior, m) if prior is not None else {}
    return MaskLLMResult(
        masks=masks, prior=prior, changed=changed, history=result.history, last_eval=result.last_eval,
        steps=result.step, resumed_from=result.resumed_from,
    )


# settings that change the learned masks (the loop checks its own: steps, lr, seed, ...)
_RESULT_FIELDS = ("pattern", "batch_size", "tau", "kappa", "schedule", "prior_strength", "init_std", "reg_lambda",
                  "loss", "train_weights", "logits_dtype", "targets", "exclude")


def _fingerprint(x) -> str:
    """A short hash of tensors inside x (data batches, prior masks); '' for a callable."""
    import hashlib

    h = hashlib.sha256()

    def walk(v):
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
        elif isinstance(v, Mapping):
            for k in sorted(v):
                h.update(str(k).encode())
                walk(v[k])
        elif isinstance(v, (list, tuple)):
            for i in v:
                walk(i)
        else:
            h.update(repr(v).encode())

    if callable(x) and not isinstance(x, (list, tuple, Mapping, torch.Tensor)):
        return ""
    if hasattr(x, "__len__") and not isinstance(x, (list, tuple, Mapping, torch.Tensor)):
        n = len(x)  # a dataset: its length and a few items, not every item
        x = [n] + [x[i] for i in sorted({0, n // 2, n - 1}) if n > 0]
    walk(x)
    return h.hexdigest()[:16]


class _RunIdentity:
    """Stored in every checkpoint (``extra_state``): the MaskLLM settings and a hash of the
    data and the prior; a resume with different ones is refused."""

    def __init__(self, cfg: MaskLLMConfig, batches, prior):
        d = config_dict(cfg)
        self.state = {"maskllm": {k: d[k] for k in _RESULT_FIELDS}, "data": _fingerprint(batches),
                      "prior": _fingerprint(prior) if prior is not None else None}
        self.state = json.loads(json.dumps(self.state))  # tuples -> lists, as they come back

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, sd: Mapping) -> None:
        for key in ("maskllm", "data", "prior"):
            if key not in sd:
                raise ValueError(f"train_masks: the checkpoint was not written by train_masks (no {key!r} entry)")
        for k, v in self.state["maskllm"].items():
            if sd["maskllm"].get(k) != v:
                raise ValueError(
                    f"train_masks: cannot resume: the checkpoint was trained with {k}={sd['maskllm'].get(k)!r}, "
                    f"this run has {k}={v!r}"
                )
        if sd["data"] != self.state["data"]:
            raise ValueError("train_masks: cannot resume: the training data differ from the checkpoint's")
        if sd["prior"] != self.state["prior"]:
            raise ValueError("train_masks: cannot resume: the prior masks differ from the checkpoint's")


def _wants_distributed(mode: str) -> bool:
    if mode in ("ddp", "fsdp2"):
        return True
    return mode == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _final_masks(model) -> dict:
    """The argmax masks as plain tensors (FSDP2: from the all-gathered logits)."""
    from torch.distributed.tensor import DTensor

    from .layer import mask_from_logits

    out = {}
    for name, mod in mask_layers(model).items():
        logits = mod.logits.detach()
        if isinstance(logits, DTensor):
            logits = logits.full_tensor()
        shape = (mod.out_features, mod.in_features)
        out[name] = mask_from_logits(logits, mod.n, mod.m, shape)
    return out


def config_dict(cfg: MaskLLMConfig) -> dict:
    """The config as JSON-able values (a prior given as masks becomes "<masks>")."""
    d = asdict(cfg)
    if not isinstance(d["prior"], (str, type(None))):
        d["prior"] = "<masks>"
    for k in ("tau", "kappa", "betas"):
        d[k] = list(d[k])
    return d
