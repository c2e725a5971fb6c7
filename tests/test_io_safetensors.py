"""safetensors reading/writing checked against the safetensors library itself."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mergescope as ms
from mergescope.errors import MergescopeError
from mergescope.io import SafetensorsFile, read_header

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
              torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]


def sample_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, dtype in enumerate(ALL_DTYPES):
        base = torch.randn(3, 5, generator=g) * 4
        state[f"t{i}.{str(dtype).split('.')[-1]}"] = base.to(dtype) if dtype != torch.bool else base > 0
    state["scalar"] = torch.tensor(2.5)
    state["empty"] = torch.zeros(0, 4)
    return state


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 and a.dtype != torch.bool else a,
                       b.view(torch.uint8) if b.dtype.itemsize == 1 and b.dtype != torch.bool else b)


def test_reads_what_the_safetensors_library_writes(tmp_path):
    state = sample_state()
    save_file(state, tmp_path / "ref.safetensors", metadata={"k": "v"})
    ckpt = ms.load(tmp_path / "ref.safetensors")
    assert set(ckpt) == set(state)
    assert ckpt.metadata == {"k": "v"}
    for name, t in state.items():
        assert_same(ckpt[name], t)
        assert_same(ckpt.read(name), t)


def test_safetensors_library_reads_what_we_write(tmp_path):
    state = sample_state(1)
    ms.save(state, tmp_path / "ours.safetensors", metadata={"seed": "1"})
    loaded = load_file(tmp_path / "ours.safetensors")
    for name, t in state.items():
        assert_same(loaded[name], t)


def test_sharded_folder_round_trip_with_index(tmp_path):
    state = {f"layer{i}.weight": torch.full((250,), float(i)) for i in range(10)}  # 1000 bytes each
    ms.save(state, tmp_path / "out", max_shard_size=2500, metadata={"recipe_sha256": "abc"})
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert shards == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    assert index["metadata"]["total_size"] == 10_000
    assert set(index["weight_map"]) == set(state)
    for shard in shards:  # every shard is a valid file of the reference library, within the size cap
        part = load_file(tmp_path / "out" / shard)
        assert 0 < sum(t.numel() * 4 for t in part.values()) <= 2500
    ckpt = ms.load(tmp_path / "out")
    assert ckpt.metadata["recipe_sha256"] == "abc" and ckpt.metadata["mergescope_version"] == ms.__version__
    for name, t in state.items():
        assert torch.equal(ckpt[name], t)


def test_opening_reads_headers_only(tmp_path):
    ms.save({f"w{i}": torch.randn(64) for i in range(40)}, tmp_path / "big", max_shard_size=300)
    ckpt = ms.load(tmp_path / "big")
    assert len(ckpt.files) == 40 and len(ckpt) == 40
    assert all(f._mmap is None for f in ckpt._files)  # nothing mapped until a tensor is read
    ckpt["w3"]
    assert sum(f._mmap is not None for f in ckpt._files) == 1


def test_views_never_write_back_to_the_file(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(4)}, path)
    before = path.read_bytes()
    t = ms.load(path)["w"]
    t.mul_(7)
    assert path.read_bytes() == before


def test_pickle_checkpoints_load_only_with_weights_only(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save(state, tmp_path / "m.pt")
    torch.save({"state_dict": state}, tmp_path / "wrapped.bin")
    assert torch.equal(ms.load(tmp_path / "m.pt")["w"], state["w"])
    assert torch.equal(ms.load(tmp_path / "wrapped.bin")["w"], state["w"])


class Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_pickle_needing_arbitrary_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.ones(1), "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(MergescopeError, match="evil.pt: refused"):
        ms.load(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


def write_raw(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "past the end of the data"),
        ({"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype 'F99'"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12, None, "needs 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"", None, "non-negative"),
        (b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}', b"\0" * 4, None, "twice"),
        (b"{not json", b"", None, "not valid JSON"),
        (b"{}", b"", 2**40, "exceeds"),
        (b"{}", b"", 1000, "runs past the end"),
    ],
)
def test_malformed_headers_name_file_tensor_and_problem(tmp_path, header, data, length, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(MergescopeError, match=message) as err:
        ms.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_truncated_real_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MergescopeError, match="truncated"):
        ms.load(path)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_header_parser_never_crashes_on_garbage(tmp_path_factory, blob):
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(blob)
    try:
        read_header(path)
    except MergescopeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5),
                       st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "I8", "BOOL", "X"]),
                                              "shape": st.lists(st.integers(-1, 4), max_size=3),
                                              "data_offsets": st.lists(st.integers(-2, 40), min_size=0, max_size=3)}),
                       max_size=4),
       st.integers(0, 40))
def test_structured_header_fuzz(tmp_path_factory, header, data_len):
    path = write_raw(tmp_path_factory.mktemp("fuzz") / "f.safetensors", header, b"\0" * data_len)
    try:
        _, tensors, _ = read_header(path)
    except MergescopeError:
        return
    f = SafetensorsFile(path)  # accepted headers must be readable within the file
    for name in tensors:
        f.read(name)
