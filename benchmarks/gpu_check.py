"""GPU check: throughput, MFU and peak memory of vlm-adapters vs transformers' Llava, on one GPU.

A SigLIP-so400m-sized tower at 384 px, a 2-layer MLP connector and a Qwen2.5-0.5B-sized LLM,
random weights from inline configs (no download), one synthetic batch. Cases: ``align`` and
``full`` (bf16), ``qlora`` (4-bit NF4 LLM + LoRA) and ``fsdp2`` (full finetune under FSDP2's
``fully_shard``, one process; skipped with the reason when unavailable). Each case runs on our
model and on ``LlavaForConditionalGeneration`` with the same weights and batch. Not a test; see
benchmarks/README.md.

    python benchmarks/gpu_check.py [--steps 30] [--warmup 3] [--cases align,full,qlora,fsdp2]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import FEATURE_LAYER, WORDS, _to_llava_key  # noqa: E402  (same composition rules)

SIGLIP = {  # SigLIP so400m/14 at 384 px: 27 x 27 = 729 patches, no CLS token
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
}
QWEN = {  # Qwen2.5-0.5B
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
TINY_SIGLIP = {**SIGLIP, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_SIGLIP.update(num_attention_heads=4, image_size=56)
TINY_QWEN = {**QWEN, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_QWEN.update(num_attention_heads=4, vocab_size=512, max_position_embeddings=1024)
LORA = {"r": 128, "alpha": 256, "dropout": 0.05}  # LLaVA-1.5's LoRA
LLM_LINEARS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
CASES = ("align", "full", "qlora", "fsdp2")
SEED = 0


def main() -> int:
    args = _parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print(
            "gpu_check: no CUDA device here; nothing to measure (run it on a machine with one GPU)"
        )
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(SEED)
    name, peak = _device_peak(device)
    sizes = "tiny smoke-test sizes, numbers meaningless" if args.smoke else "full sizes"
    print(f"gpu_check on {name} ({sizes}); bf16 dense peak: {_peak_text(peak)}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vlm-gpu-check-") as tmp:
        bench = Bench(Path(tmp), device, args)
        rows = [row for case in args.cases for row in bench.run_case(case)]
    _print_table(rows, peak)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 1 if any(row.get("error") for row in rows) else 0


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="Timed steps per case and side.")
    parser.add_argument("--warmup", type=int, default=3, help="Untimed steps before them.")
    parser.add_argument("--batch", type=int, default=8, help="Samples per step.")
    parser.add_argument("--text-tokens", type=int, default=256, help="Text tokens per sample.")
    parser.add_argument(
        "--cases", type=_cases, default=list(CASES), help=f"Comma-separated: {','.join(CASES)}."
    )
    parser.add_argument(
        "--smoke", action="store_true", help="Tiny sizes on any device (checks the script runs)."
    )
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.batch, args.text_tokens = 2, 1, 2, 16
    return args


def _cases(text: str) -> list[str]:
    cases = [c.strip() for c in text.split(",") if c.strip()]
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        raise argparse.ArgumentTypeError(f"unknown case(s) {unknown}; choose from {CASES}")
    return cases


def _device_peak(device: torch.device) -> tuple[str, float | None]:
    """The device's name and its bf16 dense peak (FLOP/s) when known."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((flops for key, flops in PEAK_BF16 if key in name), None)


def _peak_text(peak: float | None) -> str:
    return f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown peak (MFU not computed)"


class Bench:
    """One set of random weights, one batch; builds each side per case and measures it."""

    def __init__(self, tmp: Path, device: torch.device, args: argparse.Namespace) -> None:
        self.tmp, self.device, self.args = tmp, device, args
        self.vision, self.llm = (TINY_SIGLIP, TINY_QWEN) if args.smoke else (SIGLIP, QWEN)
        self.state, self.image_token_id = self._prepare()
        self.batch = self._batch()

    # ------------------------------------------------------------------ setup

    def _our_config(self, quantized: bool = False) -> dict[str, Any]:
        llm: dict[str, Any] = {"type": "hf", "tokenizer": str(self.tmp / "tokenizer")}
        llm["dtype"] = "bfloat16"
        if quantized:  # the saved full-precision LLM, quantized on load like a hub checkpoint
            llm["model"] = str(self.tmp / "llm")
            llm["quantization"] = {"bits": 4, "quant_type": "nf4", "compute_dtype": "bfloat16"}
        else:
            llm["config"] = self.llm
        vision = {"type": "hf", "config": self.vision, "feature_layer": FEATURE_LAYER}
        connector = {"type": "mlp", "depth": 2, "activation": "gelu"}
        return {"vision": {**vision, "dtype": "bfloat16"}, "connector": connector, "llm": llm}

    def _prepare(self) -> tuple[dict[str, torch.Tensor], int]:
        """Tokenizer, one set of bf16 random weights (kept on the CPU) and the LLM saved as a
        transformers checkpoint (what the QLoRA cases quantize)."""
        from vlm_adapters import build_vlm
        from vlm_adapters.demo import build_word_tokenizer

        build_word_tokenizer(WORDS, out_dir=self.tmp / "tokenizer")
        torch.manual_seed(SEED)
        model = build_vlm(self._our_config()).to(torch.bfloat16)
        model.llm.transformers_model.save_pretrained(self.tmp / "llm")
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return state, model.image_token_id

    def _batch(self) -> dict[str, torch.Tensor]:
        """Each sample: one image (its placeholders after the first token), random text, the
        answer (last quarter of the text) supervised."""
        g = torch.Generator().manual_seed(SEED)
        args, patches = self.args, (self.vision["image_size"] // self.vision["patch_size"]) ** 2
        low = self.image_token_id + 1  # text ids above every special token
        text = torch.randint(
            low, self.llm["vocab_size"], (args.batch, args.text_tokens), generator=g
        )
        image = torch.full((args.batch, patches), self.image_token_id)
        input_ids = torch.cat([text[:, :1], image, text[:, 1:]], dim=1)  # [B, T]
        labels = torch.full_like(input_ids, -100)
        labels[:, -(args.text_tokens // 4) :] = input_ids[:, -(args.text_tokens // 4) :]
        size = self.vision["image_size"]
        pixels = torch.randn(args.batch, 3, size, size, generator=g)  # [B, 3, H, W]
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        batch.update(pixel_values=pixels.to(torch.bfloat16), labels=labels)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ cases

    def run_case(self, case: str) -> list[dict[str, Any]]:
        if case == "fsdp2":
            reason = _fsdp2_unavailable(self.device)
            if reason:
                print(f"fsdp2: skipped: {reason}", flush=True)
                return [{"case": case, "side": "both", "error": None, "skipped": reason}]
        rows = []
        for side in ("ours", "theirs"):
            print(f"{case}: {side} ...", flush=True)
            rows.append({"case": case, "side": side, **self._measure_side(case, side)})
        return rows

    def _measure_side(self, case: str, side: str) -> dict[str, Any]:
        try:
            with _process_group(self.device) if case == "fsdp2" else contextlib.nullcontext():
                model = (self._ours if side == "ours" else self._theirs)(case)
                return self._train(model, case)
        except Exception as error:  # report and go on: one failing case must not hide the rest
            traceback.print_exc()
            first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
            return {"error": f"{type(error).__name__}: {first}"}
        finally:
            model = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _ours(self, case: str) -> Any:
        from vlm_adapters import build_vlm
        from vlm_adapters.model.lora import LoraSettings
        from vlm_adapters.training.config import FinetuneStage
        from vlm_adapters.training.recipes import configure_stage

        torch.manual_seed(SEED)
        model = build_vlm(self._our_config(quantized=case == "qlora"))
        if case == "qlora":  # the LLM loaded its (quantized) weights itself
            rest = {k: v for k, v in self.state.items() if not k.startswith("llm.")}
            model.vision.to(torch.bfloat16)
            model.connector.to(torch.bfloat16)
            model.load_state_dict(rest, strict=False)
            model.to(self.device)
            settings = FinetuneStage(train_llm="lora", lora=LoraSettings(**LORA))
            configure_stage(model, "finetune", settings)
            return model
        model.to(torch.bfloat16).load_state_dict(self.state)
        model.to(self.device)
        model.requires_grad_(False)
        model.connector.requires_grad_(True)
        model.llm.requires_grad_(case != "align")
        if case == "fsdp2":
            _shard_ours(model)
        return model

    def _theirs(self, case: str) -> Any:
        from transformers import BitsAndBytesConfig, LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(
            vision_config=self.vision,
            text_config=self.llm,
            image_token_id=self.image_token_id,
            projector_hidden_act="gelu",
            vision_feature_layer=FEATURE_LAYER,
            vision_feature_select_strategy="full",  # SigLIP has no CLS token
            multimodal_projector_bias=True,
            tie_word_embeddings=self.llm["tie_word_embeddings"],
        )
        place = torch.cuda.current_device() if self.device.type == "cuda" else "cpu"
        kwargs: dict[str, Any] = {"dtype": torch.bfloat16, "device_map": {"": place}}
        if case == "qlora":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
                llm_int8_skip_modules=[
                    "model.vision_tower",
                    "model.multi_modal_projector",
                    "lm_head",
                ],
            )
        state = {_to_llava_key(k): v for k, v in self.state.items()}
        if self.llm["tie_word_embeddings"]:  # one tensor; transformers ties the head to it
            state.pop("lm_head.weight")
        model = LlavaForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state, **kwargs
        )
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        if case == "qlora":
            return _their_qlora(model)
        model.model.language_model.requires_grad_(case != "align")
        model.lm_head.requires_grad_(case != "align")
        if case == "fsdp2":
            _shard(model)
        return model

    def _train(self, model: Any, case: str) -> dict[str, Any]:
        """Loss before any update, FLOPs of one step, then warmup + timed steps."""
        from torch.utils.flop_counter import FlopCounterMode

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        def step() -> float:
            with autocast:
                loss = model(**self.batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        model.eval()
        with torch.no_grad(), autocast:
            loss0 = model(**self.batch).loss.item()
        model.train()
        flops = None
        if case != "fsdp2":  # the same maths as `full`; the counter does not see through FSDP
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        for _ in range(self.args.warmup):
            step()
        self._sync()
        start = time.perf_counter()
        for _ in range(self.args.steps):
            step()
        self._sync()
        seconds = (time.perf_counter() - start) / self.args.steps
        tokens = int(self.batch["attention_mask"].sum())
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return {"loss0": loss0, "step_s": seconds, "tok_s": tokens / seconds, "flops": flops,
                "peak_bytes": peak, "error": None}  # fmt: skip

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _their_qlora(model: Any) -> Any:
    """transformers + peft QLoRA as a user writes it, on the same parts as ours: k-bit
    preparation of the language model and head, LoRA on the LLM's linear layers."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    for part in (model.model.language_model, model.lm_head):
        prepare_model_for_kbit_training(part, use_gradient_checkpointing=False)
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=rf".*language_model\..*\.{LLM_LINEARS}",
    )
    for layer in model.modules():  # as ours: no CPU repacking (smoke runs; no-op on CUDA)
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
    wrapped = get_peft_model(model, config)
    model.model.multi_modal_projector.requires_grad_(True)
    return wrapped


def _fsdp2_unavailable(device: torch.device) -> str | None:
    """Why FSDP2 cannot run here (one line), or None."""
    if not torch.distributed.is_available():
        return "this torch build has no torch.distributed"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    if device.type == "cuda" and not torch.distributed.is_nccl_available():
        return "NCCL is not available"
    return None


@contextlib.contextmanager
def _process_group(device: torch.device) -> Any:
    """A one-process group (world size 1) for FSDP2."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _shard_ours(model: torch.nn.Module) -> None:
    """The training engine's own FSDP2 wrapping when this version has it, else :func:`_shard`."""
    try:
        from vlm_adapters.training.sharding import shard_model
    except ImportError:
        print("fsdp2: no vlm_adapters.training.sharding.shard_model; sharding blocks directly")
        _shard(model)
        return
    shard_model(model)


def _shard(model: torch.nn.Module) -> None:
    """FSDP2: each transformer block (vision and LLM) its own unit, the rest in the root."""
    from torch.distributed.fsdp import fully_shard

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.ModuleList) and name.endswith("layers"):
            for block in module:
                fully_shard(block)
    fully_shard(model)


def _print_table(rows: list[dict[str, Any]], peak: float | None) -> None:
    print()
    print(f"{'case':<6} {'side':<7} {'tok/s':>9} {'step ms':>8} {'TFLOP/step':>10} "
          f"{'MFU':>6} {'peak GiB':>8} {'loss0':>9}")  # fmt: skip
    by_case: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_case.setdefault(row["case"], {})[row["side"]] = row
    for row in rows:
        if row["case"] == "fsdp2" and row.get("flops", 0) is None:  # same maths as `full`
            row["flops"] = by_case.get("full", {}).get(row["side"], {}).get("flops")
        if row.get("skipped"):
            print(f"{row['case']:<6} skipped: {row['skipped']}")
        elif row.get("error"):
            print(f"{row['case']:<6} {row['side']:<7} FAILED: {row['error']}")
        else:
            print(_row_text(row, peak))
    for case, sides in by_case.items():
        ours, theirs = sides.get("ours"), sides.get("theirs")
        if not ours or not theirs or ours.get("error") or theirs.get("error"):
            continue
        tok = ours["tok_s"] / theirs["tok_s"]
        mem = _ratio(ours["peak_bytes"], theirs["peak_bytes"])
        diff = abs(ours["loss0"] - theirs["loss0"])
        flag = "" if diff <= 2e-2 * max(1.0, abs(theirs["loss0"])) else "  <- losses disagree"
        print(f"{case:<6} ratio   tok/s x{tok:.2f}  peak memory x{mem}  |loss0 diff| {diff:.3g}"
              f"  (ours / theirs){flag}")  # fmt: skip


def _row_text(row: dict[str, Any], peak: float | None) -> str:
    flops = row["flops"]
    tflop = f"{flops / 1e12:10.2f}" if flops else f"{'-':>10}"
    mfu = f"{flops / row['step_s'] / peak:6.1%}" if flops and peak else f"{'-':>6}"
    mem = f"{row['peak_bytes'] / 2**30:8.2f}" if row["peak_bytes"] else f"{'-':>8}"
    return (f"{row['case']:<6} {row['side']:<7} {row['tok_s']:9.0f} {row['step_s'] * 1e3:8.1f} "
            f"{tflop} {mfu} {mem} {row['loss0']:9.4f}")  # fmt: skip


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b and not math.isnan(a / b) else "-"


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
