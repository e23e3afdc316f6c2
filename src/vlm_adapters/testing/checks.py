"""Conformance checks for components: does a plugin honour the protocol it registers for?

Each ``check_*`` builds the component through its :class:`~vlm_adapters.ComponentSpec`,
exercises the protocol (shapes, declared sizes, float32 and bfloat16, frozen parameters,
safetensors round trip, rebuild from ``rebuild_kwargs()`` through the registry by name) and
raises :class:`AssertionError` with a message that says what to fix. Each returns the
component it built.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn

from vlm_adapters.connectors import Connector
from vlm_adapters.errors import ConfigError
from vlm_adapters.geometry import square_side
from vlm_adapters.llm import LLMBackend
from vlm_adapters.plugins import get_registry
from vlm_adapters.registry import ComponentConfig, ComponentSpec
from vlm_adapters.vision import ImageTransform, VisionBackbone, VisionConfig

SpecOrName = ComponentSpec | str
ConfigLike = ComponentConfig | dict[str, Any] | None


class ConformanceWarning(UserWarning):
    """A component works but misses something the protocol asks for (see the message)."""


def check_connector(
    spec_or_name: SpecOrName,
    config: ConfigLike = None,
    *,
    in_dim: int = 24,
    out_dim: int = 32,
    num_input_tokens: int = 16,
    batch_size: int = 2,
) -> Connector:
    """Check a connector: ``[B, N, in_dim] -> [B, M, out_dim]`` with M as declared."""
    spec, cfg = _resolve("connector", spec_or_name, config)
    sizes = {"in_dim": in_dim, "out_dim": out_dim, "num_input_tokens": num_input_tokens}

    def build(c: ComponentConfig) -> Connector:
        return spec.factory(c, **sizes)

    connector = _build(spec, build, cfg, Connector)
    declared = cfg.num_output_tokens(num_input_tokens)
    _expect(
        connector.num_output_tokens() == declared,
        f"{_label(spec)}: module.num_output_tokens() = {connector.num_output_tokens()} but "
        f"config.num_output_tokens({num_input_tokens}) = {declared}; they must agree",
    )
    features = torch.randn(batch_size, num_input_tokens, in_dim)  # [B, N, Dv]
    expected = (batch_size, declared, out_dim)
    _check_output(spec, connector, features, expected)
    _check_grid(spec, connector, num_input_tokens)
    _check_dtypes(spec, connector, features, expected, ((True, True),))
    _check_trainable(spec, connector, features, require_all=True)
    _check_frozen(spec, connector, features, passes_grad=True)
    _check_round_trip(spec, connector, features, lambda kw: build(spec.config.model_validate(kw)))
    _check_registry(spec, connector, features, "connector", extra=sizes)
    return connector


def check_vision_backbone(
    spec_or_name: SpecOrName, config: ConfigLike = None, *, batch_size: int = 2
) -> VisionBackbone:
    """Check a vision backbone: preprocess PIL images, ``[B,3,H,W] -> [B, num_patches, D]``.

    Its config's ``probe()`` (:class:`vlm_adapters.vision.VisionConfig`) must predict
    ``(num_patches, hidden_size)`` when it returns a value; a config class that is not a
    ``VisionConfig`` gets a :class:`ConformanceWarning`.
    """
    spec, cfg = _resolve("vision", spec_or_name, config)
    backbone = _build(spec, spec.factory, cfg, VisionBackbone)
    for attr, kind in (("hidden_size", int), ("num_patches", int), ("transform", ImageTransform)):
        _expect(
            isinstance(getattr(backbone, attr, None), kind),
            f"{_label(spec)}: set `self.{attr}` ({kind.__name__}) in __init__",
        )
    _check_probe(spec, cfg, backbone)
    pixels = _check_preprocess(spec, backbone, batch_size)
    expected = (batch_size, backbone.num_patches, backbone.hidden_size)
    _check_output(spec, backbone, pixels, expected)
    _check_dtypes(spec, backbone, pixels, expected, ((False, True), (True, False)))
    _check_trainable(spec, backbone, pixels, require_all=False)
    _check_frozen(spec, backbone, pixels, passes_grad=False)
    rebuild = lambda kw: spec.factory(spec.config.model_validate(kw))  # noqa: E731
    _check_round_trip(spec, backbone, pixels, rebuild)
    _check_registry(spec, backbone, pixels, "vision")
    return backbone


def check_llm_backend(
    spec_or_name: SpecOrName, config: ConfigLike = None, *, batch_size: int = 2, length: int = 6
) -> LLMBackend:
    """Check an LLM backend member by member: the sizes (``hidden_size``, ``vocab_size``,
    ``max_positions``), the tokenizer's image and pad tokens, ``embed`` / ``body`` / ``logits``
    against ``full_logits``, and ``generate`` with the keyword arguments vlm-adapters passes
    (a streamer that must receive every returned token, stop ids, greedy and seeded sampling).
    A backend whose ``body`` cannot keep packed samples apart (``position_ids``) gets a
    :class:`ConformanceWarning`: ``data.packing`` will be refused for it.
    """
    spec, cfg = _resolve("llm", spec_or_name, config)
    llm = _build(spec, spec.factory, cfg, LLMBackend)
    _check_sizes(spec, llm)
    _check_tokens(spec, llm)
    ids = torch.randint(0, len(llm.tokenizer), (batch_size, length))  # [B, T]
    _check_llm_pieces(spec, llm, ids)
    _check_generate(spec, llm, ids[:1])
    _check_packing(spec, llm)
    runner = _LLMRunner(llm)
    expected = (batch_size, length, llm.vocab_size)
    _check_output(spec, runner, ids, expected)
    _check_dtypes(spec, runner, ids, expected, ((True, False),))
    _check_trainable(spec, runner, ids, require_all=False)
    _check_frozen(spec, runner, ids, passes_grad=None)
    with tempfile.TemporaryDirectory() as tmp:
        llm.tokenizer.save_pretrained(tmp)
        rebuild = lambda kw: _LLMRunner(  # noqa: E731
            spec.factory(spec.config.model_validate({**kw, "tokenizer": tmp}))
        )
        _check_round_trip(spec, runner, ids, rebuild)
        _check_registry(spec, runner, ids, "llm", extra={"tokenizer": tmp})
    return llm


def check_vlm(config: Any) -> Any:
    """Build a whole model from a config (dict, ModelConfig or YAML path) and train one step.

    Checks the loss is finite, gradients reach the connector, and a
    ``save_pretrained`` / ``from_pretrained`` round trip gives identical logits.
    """
    from vlm_adapters.model.build import build_vlm
    from vlm_adapters.model.core import VisionLanguageModel

    model = build_vlm(config).eval()
    batch = _vlm_batch(model)
    out = model(**batch)
    _expect(bool(torch.isfinite(out.loss)), f"model loss is not finite: {out.loss}")
    out.loss.backward()
    _expect(
        all(p.grad is not None for p in model.connector.parameters()),
        "the loss did not reach every connector parameter",
    )
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        loaded = VisionLanguageModel.from_pretrained(tmp).eval()
    batch.pop("labels")
    with torch.no_grad():
        _expect(
            torch.equal(model(**batch).logits, loaded(**batch).logits),
            "save_pretrained / from_pretrained changed the model's logits",
        )
    return model


@contextlib.contextmanager
def registered(*specs: ComponentSpec, provider: str = "test") -> Iterator[None]:
    """Make ``specs`` resolvable by name (configs, ``build_vlm``) inside the block.

    For testing a component before its package is installed.
    """
    registry = get_registry()
    added = [
        ComponentSpec(s.kind, s.name, s.factory, s.config, s.description, provider) for s in specs
    ]
    for spec in added:
        registry.add(spec)
    try:
        yield
    finally:
        for spec in added:
            registry.remove(spec.kind, spec.name)


# --------------------------------------------------------------------------- helpers


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _label(spec: ComponentSpec) -> str:
    provider = f" from {spec.provider}" if spec.provider else ""
    return f"{spec.kind} {spec.name!r}{provider}"


def _resolve(kind: str, spec_or_name: SpecOrName, config: ConfigLike) -> tuple[Any, Any]:
    """The spec (by name from the registry, or as given) and its validated config."""
    spec = spec_or_name
    if isinstance(spec_or_name, str):
        names = get_registry().names(kind)
        _expect(
            spec_or_name in names,
            f"no {kind} component named {spec_or_name!r} is registered (have: {names}); is its "
            "package installed (`pip install -e .`) with an entry point in group `vlm_adapters`?",
        )
        spec = get_registry().get(kind, spec_or_name)
    _expect(spec.kind == kind, f"{_label(spec)}: registered as kind {spec.kind!r}, not {kind!r}")
    _expect(
        isinstance(spec.config, type) and issubclass(spec.config, ComponentConfig),
        f"{_label(spec)}: ComponentSpec.config must be a ComponentConfig subclass",
    )
    if isinstance(config, ComponentConfig):
        config = config.model_dump()
    return spec, spec.config.model_validate(config or {})


def _build(spec: ComponentSpec, build: Callable[..., Any], cfg: Any, base: type) -> Any:
    torch.manual_seed(0)
    module = build(cfg)
    _expect(
        isinstance(module, base),
        f"{_label(spec)}: the factory returned {type(module).__name__}, "
        f"not a {base.__module__.rsplit('.', 1)[0]}.{base.__name__}",
    )
    kwargs = module.rebuild_kwargs()
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise AssertionError(
            f"{_label(spec)}: rebuild_kwargs() must be JSON-serialisable (it is written to "
            f"config.json): {exc}"
        ) from None
    return module.eval()


def _run(spec: ComponentSpec, module: nn.Module, inputs: torch.Tensor, what: str) -> torch.Tensor:
    try:
        return module(inputs)
    except Exception as exc:  # reported as a conformance failure with context
        raise AssertionError(
            f"{_label(spec)}: forward failed {what}: {type(exc).__name__}: {exc}"
        ) from exc


def _check_output(
    spec: ComponentSpec, module: nn.Module, inputs: torch.Tensor, expected: tuple[int, ...]
) -> None:
    with torch.no_grad():
        out = _run(spec, module, inputs, "on float32 inputs")
    _expect(
        tuple(out.shape) == expected,
        f"{_label(spec)}: output shape {tuple(out.shape)}, expected {expected} "
        "(check the declared token count and width)",
    )
    _expect(bool(torch.isfinite(out).all()), f"{_label(spec)}: output has NaN or inf values")


def _check_dtypes(
    spec: ComponentSpec,
    module: nn.Module,
    inputs: torch.Tensor,
    expected: tuple[int, ...],
    cases: tuple[tuple[bool, bool], ...],
) -> None:
    """Run with each ``(bfloat16 parameters, bfloat16 inputs)`` case; bf16 parameters give
    bf16 outputs."""
    for low_params, low_inputs in cases:
        what = " and ".join(
            [
                f"bfloat16 {w}"
                for w, on in (("parameters", low_params), ("inputs", low_inputs))
                if on
            ]
        )
        mod = copy.deepcopy(module).to(torch.bfloat16) if low_params else module
        with torch.no_grad():
            out = _run(
                spec, mod, inputs.to(torch.bfloat16) if low_inputs else inputs, f"with {what}"
            )
        _expect(
            tuple(out.shape) == expected and bool(torch.isfinite(out.float()).all()),
            f"{_label(spec)}: with {what} the output has shape {tuple(out.shape)} (expected "
            f"{expected}) or non-finite values",
        )
        _expect(
            not low_params or out.dtype == torch.bfloat16,
            f"{_label(spec)}: with {what} the output is {out.dtype}; compute in the "
            "parameters' dtype (cast the inputs with `.to(dtype)`)",
        )


def _check_trainable(
    spec: ComponentSpec, module: nn.Module, inputs: torch.Tensor, require_all: bool
) -> None:
    """With every parameter trainable, a backward pass reaches (all / some) parameters."""
    module.requires_grad_(True).zero_grad(set_to_none=True)
    _run(spec, module, inputs, "in training").float().pow(2).mean().backward()
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    _expect(len(missing) < len(params), f"{_label(spec)}: no parameter received a gradient")
    _expect(
        not (require_all and missing),
        f"{_label(spec)}: parameters never used in forward (no gradient): {missing[:5]}; "
        "remove them (they break DistributedDataParallel)",
    )
    module.zero_grad(set_to_none=True)


def _check_frozen(
    spec: ComponentSpec, module: nn.Module, inputs: torch.Tensor, passes_grad: bool | None
) -> None:
    """Frozen parameters get no gradient. Fully frozen, with inputs that require grad, the
    output requires grad exactly when ``passes_grad`` (vision: never builds a graph)."""
    params = list(module.parameters())
    frozen = params[: max(1, len(params) // 2)]
    for p in frozen:
        p.requires_grad_(False)
    out = _run(spec, module, inputs, "with half the parameters frozen")
    if out.requires_grad:
        out.float().pow(2).mean().backward()
    _expect(
        all(p.grad is None for p in frozen),
        f"{_label(spec)}: a parameter with requires_grad=False received a gradient",
    )
    module.requires_grad_(False)
    if passes_grad is not None:
        out = _run(spec, module, inputs.detach().requires_grad_(True), "fully frozen")
        _expect(
            out.requires_grad == passes_grad,
            f"{_label(spec)}: fully frozen, "
            + (
                "it must still pass gradients to its inputs (earlier trainable modules)"
                if passes_grad
                else "it must not build an autograd graph (run under torch.no_grad)"
            ),
        )
    module.requires_grad_(True).zero_grad(set_to_none=True)


def _check_round_trip(
    spec: ComponentSpec,
    module: nn.Module,
    inputs: torch.Tensor,
    rebuild: Callable[[dict[str, Any]], nn.Module],
) -> None:
    """Weights through safetensors into a module rebuilt from ``rebuild_kwargs()``."""
    kwargs = module.rebuild_kwargs()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "weights.safetensors")
        save_model(module, path)
        torch.manual_seed(1)  # a different init, so only loaded weights can match
        try:
            clone = rebuild(json.loads(json.dumps(kwargs)))
        except Exception as exc:  # reported as a conformance failure with context
            raise AssertionError(
                f"{_label(spec)}: rebuilding from rebuild_kwargs() {kwargs} failed: {exc}"
            ) from exc
        try:
            load_model(clone, path, strict=True)
        except RuntimeError as exc:
            raise AssertionError(
                f"{_label(spec)}: the state dict does not load into the module rebuilt from "
                f"rebuild_kwargs(): {exc}"
            ) from None
    _expect_same(spec, module, clone.eval(), inputs, "after a safetensors round trip")


def _check_registry(
    spec: ComponentSpec,
    module: nn.Module,
    inputs: torch.Tensor,
    kind: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """The name resolves in the registry and rebuilds the same architecture."""

    registry = get_registry()
    _expect(
        spec.name in registry.names(kind),
        f"{_label(spec)}: not registered by name; install the package (`pip install -e .`) "
        "and declare its entry point in group `vlm_adapters`, or test inside "
        "`vlm_adapters.testing.registered(spec)`",
    )
    found = registry.get(kind, spec.name)
    _expect(
        found.factory is spec.factory and found.config is spec.config,
        f"{_label(spec)}: the registry maps {spec.name!r} to a different factory or config",
    )
    section, extra = {"type": spec.name, **module.rebuild_kwargs()}, dict(extra or {})
    if kind == "connector":
        clone = get_registry().create("connector", section, **extra)
    elif kind == "vision":
        clone = get_registry().create("vision", section)
    else:
        clone = _LLMRunner(get_registry().create("llm", {**section, **extra}))
    clone.load_state_dict(module.state_dict())
    _expect_same(spec, module, clone.eval(), inputs, "when rebuilt from the registry by name")


def _expect_same(
    spec: ComponentSpec, a: nn.Module, b: nn.Module, inputs: torch.Tensor, when: str
) -> None:
    with torch.no_grad():
        same = torch.equal(a.eval()(inputs), b(inputs))
    _expect(
        same,
        f"{_label(spec)}: outputs differ {when}; rebuild_kwargs() must describe the "
        "architecture completely",
    )


def _check_grid(spec: ComponentSpec, connector: Connector, num_input_tokens: int) -> None:
    """What AnyRes and NaFlex towers rely on: ``output_grid`` (when it gives a grid) holds
    exactly the declared tokens and ``end_of_row()`` gives the learned end-of-row token; a
    ``per_token`` connector takes any number of features."""
    cfg, declared = connector.cfg, connector.num_output_tokens(num_input_tokens)
    side = square_side(num_input_tokens)
    try:
        grid = cfg.output_grid(side, side) if side is not None else None
    except ValueError:  # refuses this grid (a pool factor that does not divide it)
        grid = None
    if grid is not None:
        rows, cols = grid
        _expect(
            rows * cols == declared,
            f"{_label(spec)}: config.output_grid({side}, {side}) = {grid} but "
            f"num_output_tokens({num_input_tokens}) = {declared}; output_grid must give the "
            "grid the tokens lie on, row by row (AnyRes lays tile tokens out on it), or None",
        )
        clone = copy.deepcopy(connector)
        clone.add_image_newline()
        newline = clone.end_of_row()
        _expect(
            isinstance(newline, torch.Tensor) and tuple(newline.shape) == (connector.out_dim,),
            f"{_label(spec)}: after add_image_newline(), end_of_row() gave {_describe(newline)}; "
            f"it must return the learned end-of-row token [out_dim={connector.out_dim}] that "
            "AnyRes puts after every row of tokens",
        )
    if cfg.per_token and num_input_tokens > 1:
        fewer = torch.randn(1, num_input_tokens - 1, connector.in_dim)  # [1, N - 1, Dv]
        with torch.no_grad():
            out = _run(spec, connector, fewer, f"on {num_input_tokens - 1} features (per_token)")
        _expect(
            tuple(out.shape) == (1, num_input_tokens - 1, connector.out_dim),
            f"{_label(spec)}: per_token is set, but {num_input_tokens - 1} features gave "
            f"{tuple(out.shape)}; a per-token connector maps every feature to one token "
            "(NaFlex towers give a variable number), else leave per_token False",
        )


def _check_probe(spec: ComponentSpec, cfg: Any, backbone: VisionBackbone) -> None:
    """``VisionConfig.probe()``, when it answers, predicts the built backbone's sizes."""
    if not isinstance(cfg, VisionConfig):
        warnings.warn(
            f"{_label(spec)}: its config class {type(cfg).__name__} is not a "
            "vlm_adapters.vision.VisionConfig; subclass it and implement probe() so that bad "
            "combinations (a pool factor that does not divide the patch grid, visual tokens "
            "beyond the LLM's context) fail while the config is read, naming file and key",
            ConformanceWarning,
            stacklevel=3,
        )
        return
    try:
        probed = cfg.probe()
    except Exception as exc:  # reported as a conformance failure with context
        raise AssertionError(f"{_label(spec)}: config.probe() failed: {exc}") from exc
    built = (backbone.num_patches, backbone.hidden_size)
    _expect(
        probed is None or tuple(probed) == built,
        f"{_label(spec)}: config.probe() = {probed} but the built backbone has (num_patches, "
        f"hidden_size) = {built}; probe() must predict them from the config alone (or return "
        "None when it cannot)",
    )


def _check_preprocess(spec: ComponentSpec, backbone: VisionBackbone, batch: int) -> torch.Tensor:
    """PIL images of any size and mode -> ``[B, 3, S, S]`` float32."""
    modes = ["RGB", "L", "RGBA", "P"]
    images = [Image.new(modes[i % 4], (40 + 7 * i, 30 + 5 * i), 60 * i) for i in range(batch)]
    pixels = backbone.preprocess(images)
    size = backbone.transform.crop_size
    _expect(
        tuple(pixels.shape) == (batch, 3, size, size) and pixels.dtype == torch.float32,
        f"{_label(spec)}: preprocess gave {tuple(pixels.shape)} {pixels.dtype}, expected "
        f"{(batch, 3, size, size)} float32",
    )
    return torch.randn_like(pixels)


LLM_MEMBERS: dict[str, str] = {
    "hidden_size": "the `hidden_size` property: the width H of the embeddings (int)",
    "vocab_size": "the `vocab_size` property: rows of the output head, the logits' last "
    "dimension V (int)",
    "max_positions": "the `max_positions` property: the context length in tokens, or None",
    "embed": "`embed(input_ids [B, T]) -> [B, T, H]`",
    "body": "`body(inputs_embeds [B, T, H], attention_mask [B, T] | None, **kwargs) -> "
    "[B, T, H]`: the decoder without its head",
    "logits": "`logits(hidden [..., H]) -> [..., V]`: the output head",
    "full_logits": "`full_logits(input_ids [B, T], attention_mask=None) -> [B, T, V]`: the "
    "model's own forward on text, which logits(body(embed(ids))) must reproduce",
    "generate": "`generate(inputs_embeds [B, T, H], attention_mask [B, T] | None, *, "
    "max_new_tokens, eos_token_id, pad_token_id, do_sample, temperature, top_p, top_k, "
    "use_cache, streamer) -> new ids [B, new]`",
}
"""What each member of the LLM backend protocol must do (the kit's failure messages)."""

_DEFAULT = (
    "the default reads a transformers causal LM in `self.model`; a backend that holds anything "
    "else must implement "
)


def _member(spec: ComponentSpec, llm: LLMBackend, name: str, *args: Any, **kwargs: Any) -> Any:
    """``llm.<name>`` (called with the arguments when given); a failure names the member."""
    try:
        value = getattr(llm, name)
        return value(*args, **kwargs) if args or kwargs else value
    except AssertionError:
        raise
    except Exception as exc:  # reported as a conformance failure naming the member
        raise AssertionError(
            f"{_label(spec)}: `{name}` failed ({type(exc).__name__}: {exc}); {_DEFAULT}"
            f"{LLM_MEMBERS[name]}"
        ) from exc


def _check_sizes(spec: ComponentSpec, llm: LLMBackend) -> None:
    for name in ("hidden_size", "vocab_size"):
        value = _member(spec, llm, name)
        _expect(
            isinstance(value, int) and value > 0,
            f"{_label(spec)}: `{name}` is {value!r}, not a positive int; implement "
            f"{LLM_MEMBERS[name]}",
        )
    context = _member(spec, llm, "max_positions")
    _expect(
        context is None or (isinstance(context, int) and context > 0),
        f"{_label(spec)}: `max_positions` is {context!r}; implement {LLM_MEMBERS['max_positions']}",
    )


def _check_tokens(spec: ComponentSpec, llm: LLMBackend) -> None:
    tok, vocab = llm.tokenizer, llm.vocab_size
    _expect(tok is not None, f"{_label(spec)}: set `self.tokenizer`")
    _expect(
        isinstance(llm.image_token_id, int) and 0 <= llm.image_token_id < vocab,
        f"{_label(spec)}: image_token_id {llm.image_token_id!r} is not a row of the "
        f"{vocab}-row input embedding; add the token and resize the embeddings",
    )
    _expect(tok.pad_token_id is not None, f"{_label(spec)}: the tokenizer needs a pad token")
    _expect(len(tok) <= vocab, f"{_label(spec)}: tokenizer ({len(tok)}) > embeddings ({vocab})")


def _check_llm_pieces(spec: ComponentSpec, llm: LLMBackend, ids: torch.Tensor) -> None:
    """embed -> body -> logits equals the wrapped causal LM's own forward."""
    mask = torch.ones_like(ids)
    expected = (*ids.shape, llm.hidden_size)
    with torch.no_grad():
        embeds = _member(spec, llm, "embed", ids)  # [B, T, H]
        _expect(
            tuple(embeds.shape) == expected,
            f"{_label(spec)}: embed gave {tuple(embeds.shape)}, expected {expected} (hidden_size)",
        )
        hidden = _member(spec, llm, "body", embeds, mask)  # [B, T, H]
        _expect(
            tuple(hidden.shape) == expected,
            f"{_label(spec)}: body gave {tuple(hidden.shape)}, expected {expected}",
        )
        pieces = _member(spec, llm, "logits", hidden)  # [B, T, V]
        _expect(
            tuple(pieces.shape) == (*ids.shape, llm.vocab_size),
            f"{_label(spec)}: logits gave {tuple(pieces.shape)}, expected "
            f"{(*ids.shape, llm.vocab_size)} (vocab_size)",
        )
        whole = _member(spec, llm, "full_logits", ids, mask)
    _expect(
        tuple(whole.shape) == tuple(pieces.shape) and torch.allclose(pieces, whole, atol=1e-5),
        f"{_label(spec)}: logits(body(embed(ids))) differs from full_logits(ids); the "
        "pieces must reproduce the causal LM",
    )
    llm.requires_grad_(False)
    out = llm.logits(llm.body(embeds.requires_grad_(True), mask))
    llm.requires_grad_(True)
    _expect(
        out.requires_grad,
        f"{_label(spec)}: fully frozen, body/logits must still pass gradients to the input "
        "embeddings (stage 1 trains the connector through the frozen LLM)",
    )


class _RecordingStreamer:
    """A transformers-style streamer (``put`` / ``end``) that keeps every token it is given."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.tokens += torch.as_tensor(value).reshape(-1).tolist()

    def end(self) -> None:
        self.ended = True


_GREEDY = {"do_sample": False, "temperature": None, "top_p": None}
_HOT = {"do_sample": True, "temperature": 100.0, "top_p": 1.0, "top_k": None}
_NEW_TOKENS = 4


def _generate(
    spec: ComponentSpec,
    llm: LLMBackend,
    embeds: torch.Tensor,
    stops: list[int],
    sampling: dict[str, Any],
    streamer: Any = None,
) -> list[int]:
    """One prompt's new ids, called as vlm-adapters' generation calls ``generate``."""
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    with torch.no_grad():
        out = _member(
            spec,
            llm,
            "generate",
            embeds,
            mask,
            max_new_tokens=_NEW_TOKENS,
            eos_token_id=stops,
            pad_token_id=llm.tokenizer.pad_token_id,
            use_cache=True,
            streamer=streamer,
            **sampling,
        )
    _expect(
        isinstance(out, torch.Tensor)
        and out.dim() == 2
        and out.shape[0] == 1
        and 1 <= out.shape[1] <= _NEW_TOKENS
        and not out.is_floating_point(),
        f"{_label(spec)}: generate returned {_describe(out)} for one prompt and "
        f"max_new_tokens={_NEW_TOKENS}; it must return the new token ids only, [B, new] with "
        f"1 <= new <= max_new_tokens",
    )
    return out[0].tolist()


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _check_generate(spec: ComponentSpec, llm: LLMBackend, ids: torch.Tensor) -> None:
    """``generate`` as the CLI calls it: the streamer receives exactly the returned tokens,
    greedy decoding is deterministic, ``eos_token_id`` stops it, sampling follows
    ``do_sample``/``temperature`` and is reproducible with a seed."""
    with torch.no_grad():
        embeds = llm.embed(ids)  # [1, T, H]
    stops = [llm.image_token_id]  # rarely generated; the CLI passes the template's stop ids
    streamer = _RecordingStreamer()
    greedy = _generate(spec, llm, embeds, stops, _GREEDY, streamer)
    _expect(
        streamer.tokens == greedy,
        f"{_label(spec)}: the streamer received {streamer.tokens or 'nothing'} but generate "
        f"returned {greedy}; `generate` must call `streamer.put(new_ids)` for every new token "
        "as it comes (and `streamer.end()` at the end), or `vlm-adapters generate` and `chat` "
        "show nothing while it runs",
    )
    _expect(
        streamer.ended,
        f"{_label(spec)}: `generate` never called `streamer.end()`; call it once generation ends",
    )
    again = _generate(spec, llm, embeds, stops, _GREEDY)
    _expect(
        again == greedy,
        f"{_label(spec)}: greedy generate is not deterministic: {greedy} then {again}",
    )
    first = _generate(spec, llm, embeds, [greedy[0]], _GREEDY)
    _expect(
        first == greedy[:1],
        f"{_label(spec)}: with eos_token_id=[{greedy[0]}] generate returned {first}; it must "
        "stop after the first token in `eos_token_id` (the chat template's end of turn)",
    )
    sampled = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        sampled.append(_generate(spec, llm, embeds, stops, _HOT))
    torch.manual_seed(0)
    _expect(
        _generate(spec, llm, embeds, stops, _HOT) == sampled[0],
        f"{_label(spec)}: sampling is not reproducible: the same torch seed gave different ids",
    )
    _expect(
        any(row != greedy for row in sampled),
        f"{_label(spec)}: with do_sample=True and temperature=100, three seeds all gave the "
        f"greedy answer {greedy}; `generate` must sample when do_sample is True (with "
        "`temperature`, `top_p` and `top_k`)",
    )


def _check_packing(spec: ComponentSpec, llm: LLMBackend) -> None:
    """Warn when packed rows would leak between samples (``data.packing`` is then refused)."""
    from vlm_adapters.llm.packed_attention import check_packing

    try:
        check_packing(llm)
    except ConfigError as exc:
        warnings.warn(
            f"{_label(spec)}: data.packing will be refused ({exc}); to support it, `body` must "
            "take `position_ids` [B, T] restarting at 0 at every packed sample and keep each "
            "sample's attention inside it",
            ConformanceWarning,
            stacklevel=3,
        )


class _LLMRunner(nn.Module):
    """``ids -> logits`` through the backend's pieces, so the generic checks apply."""

    def __init__(self, llm: LLMBackend) -> None:
        super().__init__()
        self.llm = llm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.logits(self.llm.body(self.llm.embed(ids), torch.ones_like(ids)))

    def rebuild_kwargs(self) -> dict[str, Any]:
        return self.llm.rebuild_kwargs()


def _vlm_batch(model: Any) -> dict[str, torch.Tensor]:
    """One image + prompt, labels on the text after the image."""
    size = model.vision.transform.crop_size
    image = Image.new("RGB", (size + 5, size), (200, 30, 30))
    words = [w for w in model.tokenizer.get_vocab() if w.isalpha()][:4] or ["a"]
    batch = model.processor([f"<image> {' '.join(words)}"], [[image]], padding_side="right")
    labels = batch["input_ids"].clone()
    labels[labels == model.image_token_id] = -100
    return {**batch, "labels": labels}
