"""The ONNX Runtime dense reference (adaptinf.onnx_dense): export, int8 quantisation, bench cases."""

from __future__ import annotations

import importlib
import sys

import onnx
import pytest
import torch
from conftest import make_batch, make_tiny_dense

from adaptinf import onnx_dense
from adaptinf.bench import run_bench
from adaptinf.data import Batch
from adaptinf.onnx_dense import OrtDense, export_dense, ort_dense_cases, weights_digest

VOCAB = 60  # make_tiny_dense's vocabulary; its position table holds 40 tokens


def as_batch(b: dict[str, torch.Tensor]) -> Batch:
    n = b["input_ids"].shape[0]
    return Batch(b["input_ids"], b["attention_mask"], torch.zeros(n, dtype=torch.int64), torch.arange(n))


@pytest.fixture(scope="module")
def model():
    m = make_tiny_dense(hidden=32, heads=4, ffn=64, layers=2, vocab_size=VOCAB)
    with torch.no_grad():
        m.classifier.weight.mul_(50)  # spread the logits, so int8 argmax is not decided by ties
    return m


@pytest.fixture(scope="module")
def cases(model, tmp_path_factory):
    # export and quantise once for the module (torch.export takes seconds)
    return ort_dense_cases(model, tmp_path_factory.mktemp("onnx"), threads=1)


def torch_logits(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).logits


@pytest.mark.parametrize("lengths", [(32, 2, 17, 9), (13,)], ids=["padded", "batch1"])
def test_fp32_equals_torch(model, cases, lengths):
    b = make_batch(lengths, VOCAB, seed=1)
    out = cases["onnxruntime fp32"](as_batch(b))
    assert out.dtype == torch.float32 and out.shape == (len(lengths), 3)
    torch.testing.assert_close(out, torch_logits(model, b), atol=1e-4, rtol=1e-4)


def test_int8_close_to_torch(model, cases):
    b = make_batch(torch.randint(2, 33, (16,), generator=torch.Generator().manual_seed(2)).tolist(), VOCAB, seed=2)
    ref, out = torch_logits(model, b), cases["onnxruntime int8"](as_batch(b))
    assert (out - ref).abs().max() / ref.abs().max() < 0.1
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("lengths", [(40, 1, 5, 40, 3, 8, 2), (2, 2, 2)], ids=["longest", "short"])
def test_dynamic_shapes(model, cases, lengths):
    """Batch sizes and lengths other than the export example's (2 x 8) run, to the position table's end."""
    b = make_batch(lengths, VOCAB, seed=3)
    torch.testing.assert_close(cases["onnxruntime fp32"].run(**b), torch_logits(model, b), atol=1e-4, rtol=1e-4)
    assert cases["onnxruntime int8"].run(**b).shape == (len(lengths), 3)


def test_export_takes_the_padded_path_and_restores_the_model(model, tmp_path):
    assert model.packed and not model.training
    model.train()
    try:
        path = export_dense(model, tmp_path / "d.onnx")
        assert model.packed and model.training
    finally:
        model.eval()
    graph = onnx.load(str(path)).graph
    assert not {"NonZero", "ScatterND"} & {n.op_type for n in graph.node}  # no packing of real tokens
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == ["logits"]
    assert [d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", "seq"]


def test_cases_are_cached_by_weights(model, cases, tmp_path, monkeypatch):
    workdir = cases["onnxruntime fp32"].path.parent
    assert cases["onnxruntime fp32"].path.name == f"dense-{weights_digest(model)}.onnx"
    assert cases["onnxruntime int8"].path.name == f"dense-{weights_digest(model)}-int8.onnx"
    monkeypatch.setattr(onnx_dense, "export_dense", lambda *a, **k: pytest.fail("exported again"))
    again = ort_dense_cases(model, workdir, threads=1)
    assert {k: v.path for k, v in again.items()} == {k: v.path for k, v in cases.items()}
    other = make_tiny_dense(seed=1, hidden=32, heads=4, ffn=64, layers=2, vocab_size=VOCAB)
    assert weights_digest(other) != weights_digest(model)


def test_session_settings(cases):
    case = cases["onnxruntime fp32"]
    assert case.threads == torch.get_num_threads() == 1  # conftest runs tests on one thread
    opts = case.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.execution_mode.name == "ORT_SEQUENTIAL"
    assert OrtDense(case.path).threads == torch.get_num_threads()


def test_cases_run_in_the_bench(cases):
    batches = {2: [as_batch(make_batch((5, 3), VOCAB)), as_batch(make_batch((9, 9), VOCAB, seed=1))]}
    rows = run_bench(cases, batches, repeats=1, warmup=0, reference="onnxruntime fp32", progress=False)
    assert [r.case for r in rows] == ["onnxruntime fp32", "onnxruntime int8"]
    assert all(r.median_ms > 0 and r.gflops_per_sample is None for r in rows)


def test_missing_or_corrupt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX model at .*nope.onnx: export one"):
        OrtDense(tmp_path / "nope.onnx")
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        onnx_dense.quantize_onnx_int8(tmp_path / "nope.onnx", tmp_path / "q.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="bad.onnx is not a loadable ONNX model: ") as e:
        OrtDense(bad)
    assert "\n" not in str(e.value)


def test_wrong_graph_is_refused(tmp_path):
    h = onnx.helper
    x = h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    path = tmp_path / "other.onnx"
    onnx.save(h.make_model(h.make_graph([h.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                           opset_imports=[h.make_opsetid("", 17)], ir_version=8), str(path))
    with pytest.raises(ValueError, match="not an exported dense classifier: inputs \\['x'\\]"):
        OrtDense(path)


def test_missing_onnxruntime_gives_a_hint(monkeypatch):
    monkeypatch.delitem(sys.modules, "adaptinf.onnx_dense")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(ImportError, match="^adaptinf.onnx_dense needs onnxruntime: pip install onnxruntime") as e:
        importlib.import_module("adaptinf.onnx_dense")
    assert "\n" not in str(e.value)


def test_vision_dense_exports_and_matches(tmp_path):
    """A ViT dense model exports with uint8 patch inputs (batch axis dynamic) and ORT gives its logits."""
    from adaptinf.backbone import EncoderConfig, patchify
    from adaptinf.methods.dense import DenseClassifier, DenseConfig
    from adaptinf.model import ModelSpec

    cfg = EncoderConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        pre_norm=True, image_size=8, patch_size=4, num_channels=1, image_mean=(0.5,),
                        image_std=(0.5,), pooler=False, vocab_size=1, max_position_embeddings=5,
                        type_vocab_size=0, pad_token_id=0, layer_norm_eps=1e-6)
    torch.manual_seed(0)
    m = DenseClassifier(ModelSpec(cfg, ("a", "b", "c"), 5), DenseConfig()).eval()
    cases = ort_dense_cases(m, tmp_path, threads=1)
    for n in (1, 6):  # batch 1 and a larger batch through one graph
        images = torch.randint(0, 256, (n, 1, 8, 8), generator=torch.Generator().manual_seed(n), dtype=torch.uint8)
        ids, mask = patchify(images, 4), torch.ones(n, 5, dtype=torch.int64)
        out = cases["onnxruntime fp32"](Batch(ids, mask, torch.zeros(n, dtype=torch.int64), torch.arange(n)))
        with torch.no_grad():
            ref = m(ids, mask).logits
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
