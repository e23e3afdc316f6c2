"""Video: real clips (photos panned and zoomed, encoded by PyAV as H.264, MPEG-4 part 2 and
VP9 at odd sizes and frame rates, one with a variable frame rate) decoded by seeking, sampled
by count or rate, their visual tokens known before the model runs, and a batch mixing video,
several images, an AnyRes image and text only that trains, packs and generates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_adapters import VisionLanguageModel, build_vlm
from vlm_adapters.data import ConversationDataset, DataCollator
from vlm_adapters.data import video as video_module
from vlm_adapters.data.collate import PackingCollator
from vlm_adapters.data.video import VideoProblem, read_header, sample_video
from vlm_adapters.errors import ConfigError
from vlm_adapters.geometry import Sampling, frames_within_budget, video_frame_tokens
from vlm_adapters.testing import tiny_model_config
from vlm_adapters.testing.tiny import tiny_tiled_config

av = pytest.importorskip("av")
pytest.importorskip("skimage")
from clips import CLIPS, PHOTOS, with_videos, write_clip  # noqa: E402  (tests/scripts)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        name: write_clip(root / f"{name}.{CLIPS[name][1]}", name, PHOTOS[i % len(PHOTOS)])
        for i, name in enumerate(CLIPS)
    }


def _every_frame(path: Path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(float(f.time), f.to_ndarray(format="rgb24")) for f in container.decode(stream)]


def _on_screen(frames: list[tuple[float, np.ndarray]], when: float) -> np.ndarray:
    shown = [frame for time, frame in frames if time <= when + 1e-9]
    return shown[-1] if shown else frames[0][1]


# decoding and sampling


@pytest.mark.parametrize("name", sorted(CLIPS))
@pytest.mark.parametrize("sampling", [Sampling(3), Sampling(None, fps=4.0), Sampling(50, None, 4)])
def test_sampled_frames_are_the_frames_on_screen_at_their_times(clips, name, sampling):
    header = read_header(clips[name], name)
    width, height = CLIPS[name][3]
    assert header.size == (height, width)
    clip = sample_video(clips[name], name, sampling)
    expected = sampling.count(header.duration, header.frames)
    assert len(clip) == expected == len(clip.times) and clip.frames.shape[1:] == (height, width, 3)
    assert clip.times == tuple(sampling.times(header.duration, expected))
    every = _every_frame(clips[name])
    for time, frame in zip(clip.times, clip.frames):
        assert np.array_equal(frame, _on_screen(every, time))


def test_seeking_gives_the_frames_a_full_decode_gives(clips, monkeypatch):
    every = _every_frame(clips["long"])
    monkeypatch.setattr(video_module, "SEEK_GAP", 0.3)  # 6 s clip, keyframes every second
    clip = sample_video(clips["long"], "long", Sampling(5))
    assert [round(t, 2) for t in clip.times] == [0.6, 1.8, 3.0, 4.2, 5.4]
    for time, frame in zip(clip.times, clip.frames):
        assert np.array_equal(frame, _on_screen(every, time))


@pytest.mark.parametrize("name", ["vfr", "vfr-mp4"])
def test_a_variable_frame_rate_is_sampled_by_timestamps(clips, name):
    clip = sample_video(clips[name], name, Sampling(4))
    every = _every_frame(clips[name])
    assert [t for t, _ in every] == [0.0, 0.04, 0.2, 0.26, 0.7, 0.76]
    indices = [
        next(i for i, (_, f) in enumerate(every) if np.array_equal(f, c)) for c in clip.frames
    ]
    shown = [max(i for i, (t, _) in enumerate(every) if t <= when) for when in clip.times]
    assert indices == shown and len(set(indices)) > 2  # not frame indices: the long gap shows


def test_the_span_comes_from_the_last_packets_not_a_short_header(clips):
    """The VFR MP4's header claims less time than its frames span (0.5 s here); the span is
    read from its last packets (demuxed from the last keyframe, not decoded): the frame at
    0.76 s lasts the 0.06 s gap before it. So the late frames, past the header's end, are
    sampled, each the frame a full decode shows at its time."""
    path = clips["vfr-mp4"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        claimed = float(stream.duration * stream.time_base)
    assert claimed < 0.7  # the header alone would never reach the frames at 0.70 and 0.76 s
    assert read_header(path, "vfr-mp4").duration == pytest.approx(0.82)
    assert read_header(clips["vfr"], "vfr").duration == pytest.approx(0.8)  # stored durations
    every = _every_frame(path)
    for sampling in (Sampling(4), Sampling(6)):
        clip = sample_video(path, "vfr-mp4", sampling)
        assert clip.duration == pytest.approx(0.82) and clip.times[-1] > 0.7
        for time, frame in zip(clip.times, clip.frames):
            assert np.array_equal(frame, _on_screen(every, time))
        assert np.array_equal(clip.frames[-1], every[4][1])  # the frame shown from 0.70 s


def test_frame_sampling_arithmetic():
    assert Sampling(8).count(10.0, 300) == 8
    assert Sampling(8).count(0.5, 3) == 3  # never more frames than the video holds
    assert Sampling(None, fps=2).count(10.0, 300) == 20
    assert Sampling(None, fps=2, max_frames=6).count(10.0, 300) == 6
    assert Sampling(None, fps=2).count(0.1, 0) == 1
    assert Sampling(4).times(8.0, 4) == [1.0, 3.0, 5.0, 7.0]
    with pytest.raises(ConfigError, match="exactly one of num_frames and fps"):
        Sampling(4, fps=1.0)


# bad input


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(
            np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono"
        )
        frame.rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _no_frames(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height = 32, 32
        container.start_encoding()  # the header only
    return path


def test_bad_videos_are_refused_with_the_file_named(clips, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clips["h264"].read_bytes()[:200])
    unknown = tmp_path / "unknown-codec.mkv"  # the Matroska codec id of no decoder
    unknown.write_bytes(clips["vfr"].read_bytes().replace(b"V_MPEG4/ISO/AVC", b"V_QQQQQ/ISO/QQQ"))
    cases = {
        unknown: "video codec unsupported",
        corrupt: "video unreadable",
        truncated: "video unreadable",
        _audio_only(tmp_path / "audio.wav"): "no video stream",
        _no_frames(tmp_path / "empty.avi"): "video has no frames",
        tmp_path / "absent.mp4": "video missing",
    }
    for path, reason in cases.items():
        with pytest.raises(VideoProblem) as problem:
            sample_video(path, str(path), Sampling(2))
        assert problem.value.reason == reason, (path, problem.value)
        assert path.name in str(problem.value)


def test_a_playlist_cannot_make_ffmpeg_read_files_it_names(tmp_path):
    """An HLS playlist (a text file FFmpeg would open as a video) naming a segment elsewhere
    on disk is refused: only media containers are demuxed, so nothing outside the file is
    read."""
    elsewhere = tmp_path / "elsewhere" / "segment.ts"
    elsewhere.parent.mkdir()
    with av.open(str(elsewhere), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for shade in range(0, 200, 20):
            image = np.full((32, 32, 3), shade, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    playlist = tmp_path / "root" / "clip.m3u8"
    playlist.parent.mkdir()
    playlist.write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{elsewhere}\n#EXT-X-ENDLIST\n"
    )
    assert len(sample_video(elsewhere, "segment", Sampling(2)).frames) == 2  # a real segment
    with pytest.raises(VideoProblem) as problem:
        sample_video(playlist, str(playlist), Sampling(2))
    assert problem.value.reason == "video unreadable"
    with pytest.raises(VideoProblem, match="video unreadable"):
        read_header(playlist.read_bytes(), "embedded playlist")


def test_a_huge_frame_size_is_refused_from_the_header_before_decoding(clips, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded")

    monkeypatch.setattr(video_module, "_frames_at", no_decoding)
    with pytest.raises(VideoProblem, match=r"h264.mp4 has 131x97 = 12,707 pixel frames, over"):
        sample_video(clips["h264"], str(clips["h264"]), Sampling(2), max_pixels=10_000)


# geometry: tokens known before the model runs


def _model(tokenizer_dir: str, vision="hf", connector="mlp", **video) -> VisionLanguageModel:
    torch.manual_seed(0)
    config = tiny_model_config(tokenizer_dir, vision, connector)
    config["vision"]["video"] = {"num_frames": 3, **video}
    return build_vlm(config).eval()


def _record(ident: str, question: str, answer: str, **media) -> dict:
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": ident, **media, "conversations": turns}


def test_geometry_of_frames_and_budgets():
    assert video_frame_tokens(27, 2) == 196  # SigLIP-384's 27x27 grid -> OneVision's 14x14
    assert video_frame_tokens(24, 2) == 144 and video_frame_tokens(4, 1) == 16
    assert frames_within_budget([8, 8], 196, True, 64 * 196 + 2) == [8, 8]
    assert frames_within_budget([64], 196, True, 6000) == [30]
    for budget, alone, beside_image in [(4096, 20, 17), (8192, 41, 38), (16384, 64, 64)]:
        assert frames_within_budget([64], 196, True, budget) == [alone]  # docs/video.md
        assert frames_within_budget([64], 196, True, budget, fixed=729) == [beside_image]
    assert frames_within_budget([10, 2], 4, True, 30, fixed=4) == [4, 2]
    assert frames_within_budget([3, 3], 4, True, 9) is None


@pytest.mark.parametrize(
    ("vision", "video", "budget_frames"),
    [
        ("hf", {"num_frames": 3, "pool": 2}, None),
        ("hf", {"num_frames": 5, "pool": 1, "newline": False}, None),
        ("hf_siglip", {"num_frames": None, "fps": 6.0, "pool": 4}, None),
        ("hf", {"num_frames": 6, "pool": 2, "max_visual_tokens": 2 * 4 + 1}, 2),
        (tiny_tiled_config("hf", max_tiles=4), {"num_frames": 4, "pool": 2}, None),
    ],
)
def test_predicted_video_tokens_are_what_the_model_produces(
    tokenizer_dir, clips, vision, video, budget_frames
):
    model = _model(tokenizer_dir, vision, **video)
    spec = model.video_spec
    records = [
        _record(name, "<video> what moves ?", "the camera", video=path.name)
        for name, path in clips.items()
    ]
    root = next(iter(clips.values())).parent
    dataset = ConversationDataset.for_model(
        model, records, image_root=root, template="chatml", on_bad_sample="error"
    )
    checked, _ = dataset.precheck()
    for index, (name, path) in enumerate(clips.items()):
        header = read_header(path, name)
        frames = model.video.sampling().count(header.duration, header.frames)
        frames = min(frames, budget_frames or frames)
        item = dataset[index]
        assert item["video_values"].counts == (frames,)
        predicted = int((item["input_ids"] == spec.token_id).sum())
        assert predicted == spec.tokens(frames) == checked.lengths[index] - 5  # 5 words
        with torch.no_grad():
            produced = model.video_tokens(item["video_values"])
        assert produced.shape[0] == predicted


def test_a_sample_that_cannot_fit_the_budget_is_skipped_and_listed(tokenizer_dir, clips):
    model = _model(tokenizer_dir, num_frames=4, max_visual_tokens=2 * (4 + 1) - 1)
    records = [
        _record("one", "<video> ?", "yes", video="h264.mp4"),
        _record("two", "<video> <video> ?", "yes", video=["h264.mp4", "vp9.webm"]),
    ]
    root = clips["h264"].parent
    dataset = ConversationDataset.for_model(model, records, image_root=root, template="chatml")
    kept, skipped = dataset.precheck()
    assert [s.id for s in skipped] == ["two"] and skipped[0].reason == "too many visual tokens"
    assert dataset[0]["video_values"].counts == (2,)  # 4 frames cut to what fits


def test_video_paths_stay_inside_the_video_root(tokenizer_dir, clips, tmp_path):
    model = _model(tokenizer_dir)
    records = [
        _record("out", "<video> ?", "yes", video="../elsewhere.mp4"),
        _record("two", "<video> ?", "yes", video=["h264.mp4", "vp9.webm"]),
        _record("ok", "<video> ?", "yes", video="h264.mp4"),
    ]
    dataset = ConversationDataset.for_model(
        model, records, image_root=tmp_path, video_root=clips["h264"].parent, template="chatml"
    )
    _, skipped = dataset.precheck()
    assert [(s.id, s.reason) for s in skipped] == [
        ("out", "video outside video_root"),
        ("two", "video marker mismatch"),
    ]
    assert "video_root" in skipped[0].detail
    # an image named like a video resolves under image_root, the video under video_root
    (tmp_path / "h264.mp4").write_bytes(b"an image file named like the clip")
    assert dataset._image_file("h264.mp4") == (tmp_path / "h264.mp4").resolve()
    assert dataset._video_file("h264.mp4") == clips["h264"].resolve()


def test_a_config_that_cannot_lay_frames_out_fails_when_built(tokenizer_dir):
    with pytest.raises(ConfigError, match="vision.video.pool: 8 is larger than the 4x4"):
        _model(tokenizer_dir, pool=8)
    with pytest.raises(ConfigError, match="vision.video: the 'resampler' connector's tokens"):
        _model(tokenizer_dir, connector="resampler")
    with pytest.raises(ConfigError, match="num_frames or fps, not both"):
        _model(tokenizer_dir, fps=2.0)


def test_timestamps_go_into_the_prompt(tokenizer_dir, clips):
    model = _model(tokenizer_dir, timestamps=True, num_frames=2)
    records = [_record("t", "what moves ?", "the camera", video="h264.mp4")]
    dataset = ConversationDataset.for_model(
        model, records, image_root=clips["h264"].parent, template="chatml"
    )
    seen = []
    encode = dataset.processor.encode
    dataset.processor.encode = lambda turns, *args: seen.append(turns) or encode(turns, *args)
    assert dataset[0]["video_values"].counts == (2,)
    text = seen[0][0]["value"]
    assert text.startswith("<video>\nThe video lasts for 0.86 seconds, and 2 frames are ")
    assert "These frames are located at 0.21s,0.64s. Please answer" in text


# a mixed batch: video, several images, an AnyRes image, text only

MIXED = [
    _record("video", "<video> what is in the video ?", "a red circle", video="h264.mp4"),
    _record(
        "images", "<image> <image> what shape is at the top left ?", "a blue square",
        image=["tiny.png", "square.png"],
    ),
    _record("anyres", "<image>\nwhat colour is the circle ?", "red", image="wide.png"),
    _record("text", "how many shapes are there ?", "two"),
    _record(
        "both", "<image> then <video> what changed ?", "the shapes", image="tiny.png",
        video=["vfr.mkv"],
    ),
]  # fmt: skip


def _mixed(tokenizer_dir: str, clips: dict[str, Path], pool: int = 2):
    root = clips["h264"].parent
    rng = np.random.default_rng(0)
    for name, size in {"tiny": (9, 6), "square": (40, 40), "wide": (120, 30)}.items():
        pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{name}.png")
    model = _model(tokenizer_dir, tiny_tiled_config("hf", max_tiles=4), pool=pool)
    dataset = ConversationDataset.for_model(
        model, MIXED, image_root=root, template="chatml", on_bad_sample="error"
    )
    return model, [dataset[i] for i in range(len(MIXED))]


def test_a_mixed_batch_trains_and_generates(tokenizer_dir, clips):
    model, items = _mixed(tokenizer_dir, clips)
    batch = DataCollator(model.tokenizer.pad_token_id)(items)
    assert batch["video_values"].counts == (3, 3) and len(batch["pixel_values"]) == 4
    keys = ("input_ids", "attention_mask", "labels", "pixel_values", "video_values")
    inputs = {k: batch[k] for k in keys}
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(**inputs).loss
        loss.backward()
        assert model.connector.image_newline.grad.abs().sum() > 0
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses
    model.eval()
    frames = sample_video(clips["h264"], "h264", model.video.sampling()).frames
    question = [{"from": "human", "value": "<video> what is in the video ?"}]
    answers = model.generate([question], videos=[frames], template="chatml")
    assert answers == ["a red circle"]


def test_padded_and_packed_video_batches_give_the_same_per_sample_loss(tokenizer_dir, clips):
    model, items = _mixed(tokenizer_dir, clips, pool=1)
    padded = DataCollator(model.tokenizer.pad_token_id)(items)
    total = sum(len(item["input_ids"]) for item in items)
    packed = PackingCollator(model.tokenizer.pad_token_id, max_length=total - 1)(items)
    assert 1 < packed["input_ids"].shape[0] < len(items)
    with torch.no_grad():
        keys = ("input_ids", "attention_mask", "pixel_values", "video_values")
        rows = model(**{k: padded[k] for k in keys}).logits
        packs = model(**{k: packed[k] for k in (*keys, "position_ids")}).logits
    for index, item in enumerate(items):
        n = len(item["input_ids"])
        row, start = _where(packed, item["input_ids"])
        alone = _loss(rows[index, : n - 1], item["labels"][1:])
        together = _loss(packs[row, start : start + n - 1], item["labels"][1:])
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100)


def _where(packed: dict, ids: torch.Tensor) -> tuple[int, int]:
    for row, row_ids in enumerate(packed["input_ids"]):
        for start in (packed["position_ids"][row] == 0).nonzero().flatten().tolist():
            if torch.equal(row_ids[start : start + len(ids)], ids):
                return row, start
    raise AssertionError("sample not found in the packed rows")


# kill and resume


def test_a_killed_video_run_resumes_to_bitwise_the_same_weights(tmp_path):
    """SIGKILL mid-stage on video samples, then ``--resume auto``: the final weights equal an
    uninterrupted run's, bit for bit."""
    import json
    import signal
    import subprocess
    import sys
    import time

    scripts = Path(__file__).parent / "scripts"
    sys.path.insert(0, str(scripts))
    from tiny_train import max_weight_diff, write_tiny_config

    config = with_videos(write_tiny_config(tmp_path, num_train=8), "iv" * 6)
    script = [sys.executable, str(scripts / "tiny_train.py"), str(config)]
    args = ["--stage", "finetune", "--fresh-connector"]  # 3 steps, killed after the 2nd
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    quiet = {"stdout": subprocess.DEVNULL}
    uninterrupted = subprocess.Popen([*script, str(reference), *args], **quiet)
    process = subprocess.Popen([*script, str(killed), *args, "run.save_every=2"], **quiet)
    checkpoint = killed / "finetune" / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (killed / "finetune" / "final").exists()
    resumed = subprocess.run([*script, str(killed), "--resume", "auto", *args], check=False)
    assert resumed.returncode == 0 and uninterrupted.wait() == 0
    final = killed / "finetune" / "final"
    assert max_weight_diff(final, reference / "finetune" / "final") == 0.0
    saved = json.loads((final / "config.json").read_text())
    assert saved["vision"]["video"]["num_frames"] == 2


# the command line


def test_generate_and_chat_take_a_video(tokenizer_dir, clips, tmp_path, monkeypatch, capsys):
    import io

    from vlm_adapters.cli import main

    model = _model(tokenizer_dir, num_frames=2)
    model.save_pretrained(tmp_path / "ckpt")
    seen = []
    original = VisionLanguageModel.generate_ids

    def spy(self, input_ids, attention_mask=None, pixel_values=None, video_values=None, **kw):
        seen.append((int((input_ids == self.video_spec.token_id).sum()), video_values.counts))
        return original(self, input_ids, attention_mask, pixel_values, video_values, **kw)

    monkeypatch.setattr(VisionLanguageModel, "generate_ids", spy)
    video = str(clips["vp9"])
    argv = ["--max-new-tokens", "2", "--template", "chatml"]
    assert main(["generate", str(tmp_path / "ckpt"), "--video", video, "--prompt", "?", *argv]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO(f"what ?\n/video {clips['h264']}\nand ?\n"))
    assert main(["chat", str(tmp_path / "ckpt"), "--video", video, *argv]) == 0
    assert "(new video; conversation cleared)" in capsys.readouterr().out
    assert seen == [(2 * 4 + 1, (2,))] * 3


def test_a_video_for_a_model_without_video_is_one_line(tokenizer_dir, clips, tmp_path, capsys):
    from vlm_adapters.cli import main

    build_vlm(tiny_model_config(tokenizer_dir)).save_pretrained(tmp_path / "ckpt")
    argv = ["generate", str(tmp_path / "ckpt"), "--video", str(clips["h264"]), "--prompt", "?"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "this model takes no videos" in err


def test_eval_reads_video_samples(tokenizer_dir, clips, tmp_path, capsys):
    import json

    from vlm_adapters.cli import main

    model = _model(tokenizer_dir, num_frames=2, timestamps=True)
    model.save_pretrained(tmp_path / "ckpt")
    records = [
        _record("v", "<video> what moves ?", "the camera", video="h264.mp4"),
        _record("t", "what moves ?", "nothing"),
    ]
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))
    root = str(clips["h264"].parent)
    argv = ["eval", str(tmp_path / "ckpt"), "--data", str(data), "--images", root, "--json"]
    assert main([*argv, "--max-new-tokens", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 2 and result["loss"] > 0


def test_a_datasets_source_takes_a_videos_column(tokenizer_dir, clips):
    datasets = pytest.importorskip("datasets")
    from vlm_adapters.data.sources import RowRecords

    model = _model(tokenizer_dir, num_frames=2)
    question = [{"type": "video"}, {"type": "text", "text": " what moves ?"}]
    rows = {
        "messages": [
            [
                {"role": "user", "content": question},
                {"role": "assistant", "content": [{"type": "text", "text": "the camera"}]},
            ]
        ]
        * 2,
        "videos": [
            [{"bytes": clips["vp9"].read_bytes(), "path": None}],
            [{"bytes": None, "path": "h264.mp4"}],
        ],
    }
    records = RowRecords(datasets.Dataset.from_dict(rows), "rows")
    dataset = ConversationDataset.for_model(
        model, records, image_root=clips["h264"].parent, template="chatml", on_bad_sample="error"
    )
    for index in range(2):
        item = dataset[index]
        assert item["video_values"].counts == (2,)
        assert int((item["input_ids"] == model.video_spec.token_id).sum()) == 2 * 4 + 1


# the feature cache


def test_the_feature_cache_holds_each_video_per_sampling(tokenizer_dir, clips, tmp_path):
    from vlm_adapters.data.feature_cache import FeatureCache, image_encoder
    from vlm_adapters.training.features import fill_video_features

    model, items = _mixed(tokenizer_dir, clips)
    root = clips["h264"].parent
    cache = FeatureCache.for_backbone(tmp_path / "cache", model.vision)
    plain = ConversationDataset.for_model(model, MIXED, image_root=root, template="chatml")
    checked, _ = plain.precheck()
    cache.fill(checked.image_files(), image_encoder(model.vision, 10**8), batch_size=4)
    entries = checked.video_entries()
    assert [(Path(v).name, s.num_frames) for v, s in entries] == [("h264.mp4", 3), ("vfr.mkv", 3)]
    report = fill_video_features(model, cache, entries, max_pixels=10**8)
    assert report.computed == 2 and report.reused == 0
    assert fill_video_features(model, cache, entries, max_pixels=10**8).reused == 2
    cached = ConversationDataset.for_model(
        model, MIXED, image_root=root, template="chatml", feature_cache=cache
    )
    collate = DataCollator(model.tokenizer.pad_token_id)
    a = collate(items)
    b = collate([cached[i] for i in range(len(MIXED))])
    assert "video_values" not in b and b["video_features"].counts == (3, 3)
    keys = ("input_ids", "attention_mask", "labels")
    with torch.no_grad():
        loss = model(**{k: a[k] for k in keys}, pixel_values=a["pixel_values"],
                     video_values=a["video_values"]).loss  # fmt: skip
        again = model(**{k: b[k] for k in keys}, image_features=b["image_features"],
                      video_features=b["video_features"]).loss  # fmt: skip
    torch.testing.assert_close(again, loss, rtol=1e-6, atol=1e-6)
    other = cache.for_videos(Sampling(2, max_frames=64).key())  # another sampling: no entry
    assert other.problem(other.key(clips["h264"])) == "missing"
    entry = cache.for_videos(entries[0][1].key())
    entry.path(entry.key(entries[0][0])).write_bytes(b"broken")
    cached.on_bad_sample = "skip"
    assert cached[0].reason == "feature cache entry unusable"


def test_a_video_checkpoint_round_trips(tokenizer_dir, clips, tmp_path):
    from vlm_adapters import load

    model = _model(tokenizer_dir, num_frames=2, max_visual_tokens=64)
    torch.nn.init.normal_(model.connector.image_newline, std=0.5)
    model.save_pretrained(tmp_path / "ckpt")
    again = load(tmp_path / "ckpt").eval()
    assert again.video == model.video and again.video_spec.token_id == model.video_spec.token_id
    frames = sample_video(clips["vp9"], "vp9", model.video.sampling()).frames
    turns = [{"from": "human", "value": "<video> what moves ?"}]
    batch = model.processor.prompt_batch([turns], None, [frames])
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_lora_trains_on_videos_and_merges_to_the_same_logits(tokenizer_dir, clips):
    from vlm_adapters.model.lora import LoraSettings, apply_lora, merge_lora

    model, items = _mixed(tokenizer_dir, clips)
    apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0))
    model.vision.requires_grad_(False)
    batch = DataCollator(model.tokenizer.pad_token_id)(items)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values",
                                    "video_values")}  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(30):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.92 * losses[0], losses  # a rank-16 update of a 32-wide LLM: slowly
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # every adapter learned
    assert not any("lora" in n for n, _ in model.vision.named_parameters())
    model.eval()
    del inputs["labels"]
    with torch.no_grad():
        before = model(**inputs).logits
        merge_lora(model)
        torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-4, atol=1e-4)
