"""SpeechTokenizer codec: golden parity with the reference, strict loading, tiny builder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from miocli.codecs.speech import SpeechCodec, SpeechConfig
from miocli.codecs.speech.checkpoint import build_meta, checkpoint_layout
from miocli.codecs.speech.config import REAL_CONFIG
from miocli.codecs.speech.layers import _overlap_add_transpose, _reflect_pad
from miocli.codecs.speech.tiny import build_tiny, tiny_config
from miocli.errors import InputError, ModelError
from miocli.media.audio import read_audio

GOLDEN = Path(__file__).resolve().parent.parent / "golden" / "speech"
FOLDER = GOLDEN / "SpeechTokenizer"
WAVE = np.load(GOLDEN / "input_waveform.npy")  # (1, 20800) float32
CODES = np.load(GOLDEN / "expected_codes.npy")  # (8, 1, 65) int64
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # These tensors are tiny: extra threads only add spin-wait overhead, and on a busy shared
    # machine that overhead dominated (seconds instead of milliseconds). The reference's own
    # 1- vs 2-thread results differ by < 3e-7, far inside the tolerances below.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def codec() -> SpeechCodec:
    return SpeechCodec.load(FOLDER)


@pytest.fixture(scope="module")
def golden_state() -> dict[str, torch.Tensor]:
    return torch.load(FOLDER / "SpeechTokenizer.pt", weights_only=True)


# --- golden parity -------------------------------------------------------------------


def test_codes_equal_reference_from_waveform(codec: SpeechCodec) -> None:
    codes = codec.encode(WAVE)
    assert codes.dtype == torch.int64
    assert codes.shape == (8, 1, 65)
    np.testing.assert_array_equal(codes.numpy(), CODES)


def test_codes_equal_reference_from_wav_file(codec: SpeechCodec) -> None:
    samples = read_audio(GOLDEN / "input.wav")
    np.testing.assert_array_equal(samples, WAVE[0])
    np.testing.assert_array_equal(codec.encode(samples).numpy(), CODES)


def test_encoder_output_matches_reference(codec: SpeechCodec) -> None:
    out = codec.encoder_output(WAVE).numpy()
    np.testing.assert_allclose(out, np.load(GOLDEN / "expected_encoder_output.npy"), rtol=0, atol=ATOL)


@pytest.mark.parametrize("layers", [4, 8])
def test_decode_matches_reference(codec: SpeechCodec, layers: int) -> None:
    wave = codec.decode(torch.from_numpy(CODES[:layers]))
    assert wave.dtype == torch.float32
    assert wave.shape == (1, 1, 65 * 320)
    expected = np.load(GOLDEN / f"expected_decode_{layers}q.npy")
    np.testing.assert_allclose(wave.numpy(), expected, rtol=0, atol=ATOL)


def test_codec_properties(codec: SpeechCodec) -> None:
    assert codec.sample_rate == 16000
    assert codec.hop_length == 320
    assert codec.parts == {"encoder", "decoder"}
    # Folded conv weights + LSTMs + codebooks only: no weight_g/v, no transform, no EMA stats.
    keys = codec.net.state_dict().keys()
    assert not any(k.endswith(("weight_g", "weight_v", "embed_avg", "cluster_size", "inited")) for k in keys)
    assert not any(k.startswith("transform") for k in keys)
    assert codec.num_parameters() == sum(t.numel() for t in codec.net.state_dict().values())


# --- encode / decode behaviour ------------------------------------------------------------


def test_encode_accepts_1d_tensor_3d_and_fewer_layers(codec: SpeechCodec) -> None:
    np.testing.assert_array_equal(codec.encode(torch.from_numpy(WAVE[0])).numpy(), CODES)
    np.testing.assert_array_equal(codec.encode(WAVE[:, None, :]).numpy(), CODES)
    np.testing.assert_array_equal(codec.encode(WAVE, n_q=1).numpy(), CODES[:1])
    with pytest.raises(ValueError, match="n_q"):
        codec.encode(WAVE, n_q=9)


def test_encode_batch(codec: SpeechCodec) -> None:
    other = 0.5 * WAVE[0, ::-1]
    codes = codec.encode(np.stack([WAVE[0], other]))
    assert codes.shape == (8, 2, 65)
    np.testing.assert_array_equal(codes[:, :1].numpy(), CODES)
    assert not torch.equal(codes[:, 0], codes[:, 1])


@pytest.mark.parametrize("samples", [1, 100, 319, 321, 20799])
def test_any_length_gives_ceil_frames(codec: SpeechCodec, samples: int) -> None:
    codes = codec.encode(WAVE[0, :samples])
    frames = -(-samples // 320)
    assert codes.shape == (8, 1, frames)
    assert codec.decode(codes[:4]).shape == (1, 1, frames * 320)


def test_encode_rejects_bad_audio(codec: SpeechCodec) -> None:
    with pytest.raises(InputError, match="no samples"):
        codec.encode(np.zeros(0, dtype=np.float32))
    with pytest.raises(InputError, match="NaN"):
        codec.encode(np.full(400, np.nan, dtype=np.float32))
    with pytest.raises(InputError, match="shape"):
        codec.encode(np.zeros((2, 2, 400), dtype=np.float32))


def test_decode_rejects_bad_codes(codec: SpeechCodec) -> None:
    with pytest.raises(InputError, match="0..1023"):
        codec.decode(torch.full((4, 1, 3), 1024))
    with pytest.raises(InputError, match="0..1023"):
        codec.decode(torch.full((4, 1, 3), -1))
    with pytest.raises(InputError, match="layers"):
        codec.decode(torch.zeros((9, 1, 3), dtype=torch.long))
    with pytest.raises(InputError, match="integers"):
        codec.decode(torch.zeros((4, 1, 3)))
    with pytest.raises(InputError, match="shape"):
        codec.decode(torch.zeros((4, 3), dtype=torch.long))


def test_float64_load_gives_same_codes() -> None:
    codec64 = SpeechCodec.load(FOLDER, dtype=torch.float64)
    np.testing.assert_array_equal(codec64.encode(WAVE).numpy(), CODES)
    expected = np.load(GOLDEN / "expected_decode_4q.npy")
    np.testing.assert_allclose(codec64.decode(torch.from_numpy(CODES[:4])).numpy(), expected, atol=ATOL)


@pytest.mark.parametrize(("length", "left", "right"), [(50, 3, 3), (50, 0, 5), (50, 4, 0), (3, 4, 6), (1, 2, 2)])
def test_reflect_pad_matches_torch(length: int, left: int, right: int) -> None:
    x = torch.randn(2, 3, length)
    if length > max(left, right):
        expected = F.pad(x, (left, right), mode="reflect")
    else:  # the reference's rule for short signals: zero-extend, reflect, drop the zeros
        zeros = max(left, right) - length + 1
        expected = F.pad(F.pad(x, (0, zeros)), (left, right), mode="reflect")[..., :-zeros]
    assert torch.equal(_reflect_pad(x, left, right), expected)


@pytest.mark.parametrize(("kernel", "stride", "frames"), [(16, 8, 5), (10, 5, 1), (4, 2, 7), (3, 1, 4)])
def test_overlap_add_transpose_matches_torch(kernel: int, stride: int, frames: int) -> None:
    x = torch.randn(2, 6, frames)
    weight = torch.randn(6, 4, kernel)
    bias = torch.randn(4)
    expected = F.conv_transpose1d(x, weight, bias, stride=stride)
    torch.testing.assert_close(_overlap_add_transpose(x, weight, bias, stride), expected, rtol=0, atol=1e-5)


# --- partial loading --------------------------------------------------------------------


def test_encoder_only_does_not_materialise_decoder(codec: SpeechCodec) -> None:
    enc = SpeechCodec.load(FOLDER, parts=frozenset({"encoder"}))
    assert enc.net.decoder is None
    assert not any(k.startswith("decoder.") for k in enc.net.state_dict())
    assert enc.num_parameters() < codec.num_parameters()
    np.testing.assert_array_equal(enc.encode(WAVE).numpy(), CODES)
    with pytest.raises(RuntimeError, match="without the decoder"):
        enc.decode(torch.from_numpy(CODES[:4]))


def test_decoder_only_does_not_materialise_encoder() -> None:
    dec = SpeechCodec.load(FOLDER, parts=frozenset({"decoder"}))
    assert dec.net.encoder is None
    assert not any(k.startswith("encoder.") for k in dec.net.state_dict())
    expected = np.load(GOLDEN / "expected_decode_4q.npy")
    np.testing.assert_allclose(dec.decode(torch.from_numpy(CODES[:4])).numpy(), expected, atol=ATOL)
    with pytest.raises(RuntimeError, match="without the encoder"):
        dec.encode(WAVE)


def test_load_never_initialises_real_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    touched: list[tuple[int, ...]] = []
    for name in ("kaiming_uniform_", "uniform_", "normal_", "zeros_"):
        original = getattr(torch.nn.init, name)

        def spy(tensor: torch.Tensor, *args: object, _original=original, **kwargs: object) -> torch.Tensor:
            if not tensor.is_meta:
                touched.append(tuple(tensor.shape))
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, spy)
    SpeechCodec.load(FOLDER)
    assert touched == []


def test_unchanged_tensors_are_adopted_not_copied(golden_state: dict[str, torch.Tensor]) -> None:
    config = SpeechConfig.from_file(FOLDER / "config.json")
    codec = SpeechCodec.from_state_dict(config, golden_state)
    own = codec.net.state_dict()
    for key in ("encoder.model.13.lstm.weight_hh_l0", "quantizer.vq.layers.0._codebook.embed"):
        assert own[key].data_ptr() == golden_state[key].data_ptr(), key


def test_bad_parts_rejected() -> None:
    with pytest.raises(ValueError, match="parts"):
        SpeechCodec.load(FOLDER, parts=frozenset({"vocoder"}))
    with pytest.raises(ValueError, match="parts"):
        SpeechCodec.load(FOLDER, parts=frozenset())


# --- layouts ----------------------------------------------------------------------------


def test_real_config_layout_matches_manifest() -> None:
    manifest = json.loads((GOLDEN / "manifest_real_config.json").read_text())
    config = SpeechConfig.from_dict(manifest["config"])
    assert manifest["config"] == REAL_CONFIG
    layout = [(e.key, list(e.shape), e.kind) for e in checkpoint_layout(config)]
    assert layout == [(e["key"], e["shape"], e["kind"]) for e in manifest["entries"]]
    params = sum(int(np.prod(e["shape"])) for e in manifest["entries"] if e["kind"] == "parameter")
    assert params == manifest["num_parameter_elements"]


def test_real_config_meta_build_has_no_storage() -> None:
    config = SpeechConfig.from_dict(REAL_CONFIG)
    net = build_meta(config)
    tensors = list(net.state_dict().values())
    assert tensors and all(t.is_meta for t in tensors)
    # The inference weights are what the real checkpoint yields after folding weight norm.
    layout = {e.key: e.shape for e in checkpoint_layout(config)}
    for key, tensor in net.state_dict().items():
        source = f"{key}_v" if f"{key}_v" in layout else key
        assert tuple(tensor.shape) == layout[source], key
    assert config.hop_length == 320


def test_golden_file_follows_layout(golden_state: dict[str, torch.Tensor]) -> None:
    config = SpeechConfig.from_file(FOLDER / "config.json")
    layout = checkpoint_layout(config)
    assert [e.key for e in layout] == list(golden_state)
    assert all(tuple(golden_state[e.key].shape) == e.shape for e in layout)


# --- strictness and broken files ------------------------------------------------------------


def _folder_with(tmp_path: Path, state: dict[str, torch.Tensor] | None = None) -> Path:
    folder = tmp_path / "SpeechTokenizer"
    folder.mkdir()
    shutil.copy(FOLDER / "config.json", folder / "config.json")
    if state is not None:
        torch.save(state, folder / "SpeechTokenizer.pt")
    return folder


def test_missing_key_named(tmp_path: Path, golden_state: dict[str, torch.Tensor]) -> None:
    state = dict(golden_state)
    del state["decoder.model.3.convtr.convtr.weight_g"]
    folder = _folder_with(tmp_path, state)
    with pytest.raises(ModelError, match=r"missing keys: decoder\.model\.3\.convtr\.convtr\.weight_g") as info:
        SpeechCodec.load(folder, parts=frozenset({"encoder"}))  # checked even when not materialised
    assert str(folder / "SpeechTokenizer.pt") in info.value.message


def test_unexpected_key_named(tmp_path: Path, golden_state: dict[str, torch.Tensor]) -> None:
    state = {**golden_state, "encoder.model.99.bias": torch.zeros(3)}
    with pytest.raises(ModelError, match=r"unexpected keys: encoder\.model\.99\.bias"):
        SpeechCodec.load(_folder_with(tmp_path, state))


def test_prefixed_keys_reported(tmp_path: Path, golden_state: dict[str, torch.Tensor]) -> None:
    state = {f"module.{k}": v for k, v in golden_state.items()}
    with pytest.raises(ModelError, match=r"missing keys: .*\(\+161 more\); unexpected keys: module\."):
        SpeechCodec.load(_folder_with(tmp_path, state))


def test_wrong_shape_named(tmp_path: Path, golden_state: dict[str, torch.Tensor]) -> None:
    state = dict(golden_state)
    state["transform.weight"] = torch.zeros(16, 33)
    with pytest.raises(ModelError, match=r"wrong shapes: transform\.weight \(16, 33\) \(expected \(16, 32\)\)"):
        SpeechCodec.load(_folder_with(tmp_path, state))


def test_config_that_does_not_fit_weights(tmp_path: Path) -> None:
    folder = tmp_path / "SpeechTokenizer"
    folder.mkdir()
    shutil.copy(FOLDER / "SpeechTokenizer.pt", folder / "SpeechTokenizer.pt")
    config = json.loads((FOLDER / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_filters": 8}))
    with pytest.raises(ModelError, match="does not match its config.json: wrong shapes"):
        SpeechCodec.load(folder)


def test_uninitialised_codebook(tmp_path: Path, golden_state: dict[str, torch.Tensor]) -> None:
    state = {**golden_state, "quantizer.vq.layers.2._codebook.inited": torch.zeros(1)}
    with pytest.raises(ModelError, match="codebook layer 2 was never initialised"):
        SpeechCodec.load(_folder_with(tmp_path, state))


def test_non_tensor_entry(tmp_path: Path, golden_state: dict[str, torch.Tensor]) -> None:
    state = {**golden_state, "step": 5}
    with pytest.raises(ModelError, match="non-tensor entries: step"):
        SpeechCodec.load(_folder_with(tmp_path, state))  # type: ignore[arg-type]


def test_legacy_serialisation_still_loads(tmp_path: Path, golden_state: dict[str, torch.Tensor]) -> None:
    # Files saved by torch < 1.6 (or with the zip format turned off) cannot be memory-mapped.
    folder = _folder_with(tmp_path)
    torch.save(golden_state, folder / "SpeechTokenizer.pt", _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(SpeechCodec.load(folder).encode(WAVE).numpy(), CODES)


def test_not_a_dict(tmp_path: Path) -> None:
    folder = _folder_with(tmp_path)
    torch.save([torch.zeros(2)], folder / "SpeechTokenizer.pt")
    with pytest.raises(ModelError, match="expected a state dict"):
        SpeechCodec.load(folder)


@pytest.mark.parametrize(
    "content",
    [b"", b"this is not a checkpoint\n" * 10, (FOLDER / "SpeechTokenizer.pt").read_bytes()[:5000]],
    ids=["empty", "text", "truncated"],
)
def test_corrupt_weights(tmp_path: Path, content: bytes) -> None:
    folder = _folder_with(tmp_path)
    (folder / "SpeechTokenizer.pt").write_bytes(content)
    with pytest.raises(ModelError) as info:
        SpeechCodec.load(folder)
    assert str(folder / "SpeechTokenizer.pt") in info.value.message
    assert info.value.hint


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config not found"):
        SpeechCodec.load(tmp_path)
    folder = _folder_with(tmp_path)
    with pytest.raises(ModelError, match=r"weights not found: .*SpeechTokenizer\.pt"):
        SpeechCodec.load(folder)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must contain a JSON object"),
        (json.dumps({k: v for k, v in REAL_CONFIG.items() if k != "n_q"}), "lacks required key.*n_q"),
        (json.dumps({**REAL_CONFIG, "n_filters": "64"}), "'n_filters' must be an integer"),
        (json.dumps({**REAL_CONFIG, "n_q": True}), "'n_q' must be an integer"),
        (json.dumps({**REAL_CONFIG, "strides": [8, 0]}), "'strides' must be"),
        (json.dumps({**REAL_CONFIG, "bidirectional": 1}), "'bidirectional' must be true or false"),
        (json.dumps({**REAL_CONFIG, "activation": "ReLU"}), "activation 'ReLU' is not supported"),
    ],
)
def test_bad_config(tmp_path: Path, text: str, match: str) -> None:
    folder = tmp_path / "SpeechTokenizer"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    with pytest.raises(ModelError, match=match) as info:
        SpeechCodec.load(folder)
    assert str(folder / "config.json") in info.value.message


def test_config_extra_training_keys_ignored() -> None:
    config = SpeechConfig.from_dict({**REAL_CONFIG, "learning_rate": 1e-4, "segment_size": 48000})
    assert config.to_json_dict() == REAL_CONFIG


# --- tiny checkpoint --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_dir = tmp_path_factory.mktemp("tiny")
    build_tiny(model_dir, seed=0)
    return model_dir


def test_tiny_has_real_layout_and_token_scheme(tiny_dir: Path) -> None:
    folder = tiny_dir / "SpeechTokenizer"
    config = SpeechConfig.from_file(folder / "config.json")
    assert config == tiny_config()
    real = SpeechConfig.from_dict(REAL_CONFIG)
    for name in ("strides", "codebook_size", "n_q", "sample_rate", "bidirectional", "lstm_layers"):
        assert getattr(config, name) == getattr(real, name)
    state = torch.load(folder / "SpeechTokenizer.pt", weights_only=True)
    assert list(state) == [e.key for e in checkpoint_layout(real)]
    assert all(t.dtype == torch.float32 for t in state.values())


def test_tiny_loads_strictly_and_codes_vary(tiny_dir: Path) -> None:
    codec = SpeechCodec.load(tiny_dir / "SpeechTokenizer")
    rng = np.random.default_rng(5)
    noise = (0.3 * rng.standard_normal(16000)).astype(np.float32)
    t = np.arange(16000, dtype=np.float32) / 16000
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    codes = codec.encode(np.stack([noise, tone]))
    assert codes.shape == (8, 2, 50)
    assert not torch.equal(codes[:, 0], codes[:, 1])
    for layer in range(8):
        assert len(set(codes[layer, 0].tolist())) > 10, layer  # codebooks are not collapsed
    wave = codec.decode(codes[:4])
    assert wave.shape == (2, 1, 16000)
    assert torch.isfinite(wave).all() and 0.01 < float(wave.abs().max()) < 5


def test_tiny_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    build_tiny(tmp_path / "same", seed=0)
    build_tiny(tmp_path / "other", seed=1)
    name = "SpeechTokenizer/SpeechTokenizer.pt"
    assert (tmp_path / "same" / name).read_bytes() == (tiny_dir / name).read_bytes()
    a = torch.load(tiny_dir / name, weights_only=True)
    b = torch.load(tmp_path / "other" / name, weights_only=True)
    assert not torch.equal(a["quantizer.vq.layers.0._codebook.embed"], b["quantizer.vq.layers.0._codebook.embed"])
