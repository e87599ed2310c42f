"""Compression: Huffman coding (exact), ONNX export parity, int8 quantization, packing, and the compress command."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bonsai.compress.huffman import MAX_BITS, bits_per_value, canonical_codes, code_lengths, decode, encode
from bonsai.errors import BonsaiError
from bonsai.models.arch import pooled, preset
from bonsai.models.resnet import build


@pytest.mark.parametrize(
    "values",
    [
        np.zeros(0, np.uint8),
        np.full(1, 7, np.uint8),
        np.full(1000, 200, np.uint8),  # one repeated value
        np.arange(256, dtype=np.uint8),  # every symbol once
        np.array([0, 255] * 50, np.uint8),
        np.clip(np.random.default_rng(0).normal(0, 12, 20000), -127, 127).astype(np.int8),
        np.random.default_rng(1).integers(-128, 128, (3, 5, 7), dtype=np.int8),
    ],
    ids=["empty", "one", "repeated", "all-256", "two", "int8-normal", "int8-uniform-3d"],
)
def test_huffman_round_trip_is_bit_exact(values: np.ndarray):
    blob = encode(values)
    out = decode(blob).view(values.dtype).reshape(values.shape)
    assert out.dtype == values.dtype and np.array_equal(out, values)


def test_huffman_beats_8_bits_on_peaked_weights_and_codes_are_prefix_free():
    v = np.clip(np.random.default_rng(0).laplace(0, 4, 50000), -127, 127).astype(np.int8)
    blob = encode(v)
    assert bits_per_value(blob) < 5.5
    lengths = code_lengths(np.bincount(v.view(np.uint8), minlength=256))
    assert sum(2.0 ** -int(L) for L in lengths if L) == pytest.approx(1.0)  # Kraft: a complete prefix code
    codes = canonical_codes(lengths)
    words = [format(int(codes[s]), f"0{int(lengths[s])}b") for s in np.flatnonzero(lengths)]
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_huffman_lengths_are_limited_on_fibonacci_counts():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.zeros(256, np.int64)
    counts[:30] = fib  # an unlimited Huffman tree would be 29 levels deep
    lengths = code_lengths(counts)
    assert lengths.max() == MAX_BITS and (lengths[:30] > 0).all()
    values = np.repeat(np.arange(30, dtype=np.uint8), np.minimum(fib, 500))
    assert np.array_equal(decode(encode(values)), values)


@pytest.mark.parametrize("damage", [lambda b: b[:10], lambda b: b"XXXX" + b[4:], lambda b: b[: len(b) - 3]])
def test_damaged_huffman_blob_is_a_clear_error(damage):
    blob = encode(np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint8))
    with pytest.raises(BonsaiError, match="Huffman blob"):
        decode(damage(blob))


# ---- ONNX ------------------------------------------------------------------------------------------------------

needs_onnx = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript")), reason="pip install 'bonsai[export]'"
)


def _trained_tiny(pool: bool = False):
    torch.manual_seed(0)
    spec = preset("resnet8", 3, 3, 16)
    model = build(pooled(spec) if pool else spec, zero_init_residual=False)
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():  # non-trivial BN statistics, so that folding them into the convs is exercised
        model.train()
        for i in range(0, 64, 16):
            model(x[i : i + 16])
    return model.eval(), x


@needs_onnx
@pytest.mark.parametrize("pool", [False, True], ids=["strided", "pooled"])
def test_onnx_export_matches_pytorch_at_any_batch(tmp_path: Path, pool: bool):
    from bonsai.compress.onnx_export import export_onnx, ort_logits, session

    model, x = _trained_tiny(pool)
    sess = session(export_onnx(model, tmp_path / "m.onnx"))
    assert sess.get_inputs()[0].type == "tensor(uint8)"
    for n in (1, 7, 64):
        with torch.no_grad():
            ref = model(x[:n]).numpy()
        assert np.abs(ort_logits(sess, x[:n]) - ref).max() < 1e-4


@needs_onnx
def test_int8_model_is_close_to_float_and_huffman_packing_restores_it_exactly(tmp_path: Path):
    import onnx
    from onnx import numpy_helper

    from bonsai.compress.onnx_export import export_onnx, ort_logits, pack_onnx, quantize_int8, session, unpack_onnx

    model, x = _trained_tiny()
    fp32 = export_onnx(model, tmp_path / "m.onnx")
    int8 = quantize_int8(fp32, tmp_path / "m8.onnx", x[:48])
    ref, q = ort_logits(session(fp32), x), ort_logits(session(int8), x)
    assert np.abs(q - ref).mean() < 0.1 * ref.std()  # int8 error well under the spread of the logits
    assert (q.argmax(1) == ref.argmax(1)).mean() >= 0.9
    graph = onnx.load(str(int8)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    # the stem (the first conv, on the image's 3 channels) stays fp32, every later conv and the head are int8
    stem = next(n for n in graph.node if "Conv" in n.op_type)
    assert stem.op_type == "Conv" and inits[stem.input[1]].dtype == np.float32 and inits[stem.input[1]].shape[1] == 3
    assert ops.count("Conv") == 1 and ops.count("QLinearConv") == sum(a.dtype == np.int8 and a.ndim == 4 for a in inits.values()) >= 7
    assert any(op in ops for op in ("QGemm", "QLinearMatMul"))  # the head
    assert int8.stat().st_size < 0.45 * fp32.stat().st_size
    whole = quantize_int8(fp32, tmp_path / "all8.onnx", x[:48], fp32_stem=False)
    assert [n.op_type for n in onnx.load(str(whole)).graph.node].count("Conv") == 0  # every conv int8

    packed, stats = pack_onnx(int8)
    assert len(packed) < int8.stat().st_size and 0 < stats["bits_per_weight"] < 8
    restored = unpack_onnx(packed)
    back = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(restored).graph.initializer}
    assert back.keys() == inits.keys() and all(np.array_equal(back[k], inits[k]) and back[k].dtype == inits[k].dtype for k in inits)
    assert np.array_equal(ort_logits(session(restored), x), q)
    with pytest.raises(BonsaiError, match="not a Huffman-packed"):
        unpack_onnx(b"nonsense")


def test_latency_ratio_pairs_the_rounds():
    from bonsai.compress.pipeline import latency_ratio

    # the host slowed down in the middle round; in two rounds of three the stage took half the reference's time,
    # which the ratio of the two overall medians (3 / 4) hides
    stage, ref = {"latency_b64_ms_rounds": [1.0, 6.0, 3.0]}, {"latency_b64_ms_rounds": [2.0, 12.0, 4.0]}
    assert latency_ratio(stage, ref) == 0.5
    assert latency_ratio({"latency_b1_ms_rounds": [3.0]}, {"latency_b1_ms_rounds": [2.0]}, batch=1) == 1.5
    with pytest.raises(ValueError):  # not timed in the same rounds
        latency_ratio({"latency_b64_ms_rounds": [1.0]}, ref)


@needs_onnx
@pytest.mark.report
def test_compress_and_export_a_run(npz_data: Path, tmp_path: Path):
    import bonsai
    from bonsai.cli import main
    from bonsai.compress.pipeline import compress, latency_ratio

    from conftest import CLASSES, make_images

    run = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "r"), arch="resnet8", batch_size=16, quiet=True, precision="fp32", report=False)
    # the same classes in other images: another validation split, overlapping what the run trained on, refused
    x, y = make_images(21, seed=7)
    np.savez(other := tmp_path / "other.npz", x_train=x, y_train=y, classes=np.array(CLASSES))
    with pytest.raises(BonsaiError, match=r"dataset.json: the dataset differs .*\(fingerprint changed\); give the run's own data with --data, not .*other.npz"):
        compress(run.dir, data=other, calibration=32, repeats=1, rounds=1)
    record = compress(run.dir, calibration=32, repeats=2, lowrank=0.5, rounds=3)
    names = ["PyTorch fp32", "PyTorch fp32 low-rank 0.5", "PyTorch fp32 low-rank 0.5 + fine-tune", "ONNX fp32", "ONNX int8", "ONNX int8 + Huffman"]
    names += [f"PyTorch k-means {b}-bit{t} + Huffman" for b in (5, 4) for t in ("", " fine-tuned")]
    assert [s["stage"] for s in record["stages"]] == names
    shared5, tuned5, shared4, tuned4 = record["stages"][-4:]
    assert shared4["size_bytes"] < shared5["size_bytes"] < record["stages"][5]["size_bytes"]
    assert tuned4["size_bytes"] < tuned5["size_bytes"] < record["stages"][5]["size_bytes"]
    assert record["weight_sharing"][4]["index_bits_per_weight"] <= 4.01
    assert record["weight_sharing"]["4_finetuned"]["index_bits_per_weight"] <= 4.01
    assert json.loads((run.dir / "compression.json").read_text())["stages"][-1]["file"] == "model.shared4.tuned.bsw"
    chosen = next(s for s in record["stages"] if s["stage"] == record["final_stage"])
    assert chosen["val_acc"] >= record["stages"][0]["val_acc"] - 0.005 and "low-rank" not in chosen["stage"]
    assert all(s["size_bytes"] >= chosen["size_bytes"] for s in record["stages"] if "low-rank" not in s["stage"] and s["val_acc"] >= record["stages"][0]["val_acc"] - 0.005)
    assert record["size_reduction_vs_fp32"] == round(record["stages"][0]["size_bytes"] / chosen["size_bytes"], 2)
    del record["stages"][-4:]
    assert len(record["lowrank_layers"]) == 9 and all(r["rank"] <= r["max_rank"] for r in record["lowrank_layers"])
    assert record["stages"][1]["flops_per_image"] <= record["stages"][0]["flops_per_image"]
    del record["stages"][1:3]
    sizes = [s["size_bytes"] for s in record["stages"]]
    assert sizes[2] < sizes[1] and sizes[3] < sizes[2]
    assert record["onnx_parity_max_abs_logit_diff"] < 1e-3
    assert record["stages"][1]["val_acc"] == record["stages"][0]["val_acc"]
    assert record["stages"][3]["val_acc"] == record["stages"][2]["val_acc"]  # packing is lossless
    assert all(s["latency_b1_ms"] > 0 and s["latency_b64_ms"] > 0 and s["test_acc"] is not None for s in record["stages"])
    assert all(len(s["latency_b1_ms_rounds"]) == len(s["latency_b64_ms_rounds"]) == 3 for s in record["stages"])
    assert record["int8_latency_ratio_b64"] == latency_ratio(record["stages"][2], record["stages"][1]) > 0
    page = bonsai.report.html.write_report(run.dir).read_text()
    assert "ONNX int8 + Huffman" in page

    assert main(["export", str(run.dir), "--out", str(tmp_path / "exp")]) == 0
    # predict.json carries the run's test-time augmentation, so the export predicts as the run does
    exp = bonsai.load(tmp_path / "exp")
    assert (exp.tta, exp.tta_shift, exp.precision) == (run.tta, run.tta_shift, run.precision) and run.tta_shift == 1
    np.testing.assert_allclose(exp.predict(npz_data).probs, run.predict(npz_data).probs, atol=1e-5)
    assert exp.tta_shift_asked == run.tta_shift_asked == 1
    np.testing.assert_allclose(exp.predict(npz_data, tta=True).probs, run.predict(npz_data, tta=True).probs, atol=1e-5)
    # an export written before predict.json existed predicts without TTA unless asked
    (tmp_path / "exp" / "predict.json").unlink()
    old = bonsai.load(tmp_path / "exp")
    assert old.predict(npz_data).labels == run.predict(npz_data, tta=False).labels
    assert old.predict(npz_data, tta=True).labels == run.predict(npz_data).labels
    for text, problem in (
        ('{"precision": "auto", "tta": "yes", "tta_shift": 1, "tta_shift_asked": 1}', "damaged .tta must be true or false"),
        ('{"precision": "auto", "tta": true, "tta_shift": -1, "tta_shift_asked": 1}', "damaged .tta_shift must be whole pixels"),
        ('{"precision": "int4", "tta": true, "tta_shift": 1, "tta_shift_asked": 1}', "damaged .precision must be one of"),
        ('{"tta": true}', "damaged .missing precision, tta_shift, tta_shift_asked"),
        ("[1, 2]", "damaged .expected a JSON object, got list"),
        ("{", "not valid JSON"),
    ):
        (tmp_path / "exp" / "predict.json").write_text(text)
        with pytest.raises(BonsaiError, match=f"predict.json: {problem}"):
            bonsai.load(tmp_path / "exp")


@needs_onnx
def test_compress_with_sparsity_and_a_teacher(npz_data: Path, tmp_path: Path, capsys):
    """`bonsai compress --sparsity 0.5 --teacher RUN`: a sparse fp32 stage, then weight sharing of both the plain
    and the sparse model; the sparse files keep their zeros and are the smaller ones. A teacher whose classes
    differ is refused naming it."""
    import bonsai
    from bonsai.cli import main
    from bonsai.compress.sharing import unpack_shared

    run = bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "r"), arch="resnet8", batch_size=16, quiet=True, precision="fp32", report=False)
    args = ["compress", str(run.dir), "--calibration", "16", "--share-bits", "4", "--sparsity", "0.5", "--finetune-epochs", "0.5"]
    assert main([*args, "--share-finetune-epochs", "0.5", "--teacher", str(run.dir), "--rounds", "2", "--repeats", "1"]) == 0
    record = json.loads((run.dir / "compression.json").read_text())
    names = [s["stage"] for s in record["stages"]]
    assert names[4:] == [
        "PyTorch k-means 4-bit + Huffman", "PyTorch k-means 4-bit fine-tuned + Huffman", "PyTorch fp32 sparse 50%",
        "PyTorch sparse 50% k-means 4-bit + Huffman", "PyTorch sparse 50% k-means 4-bit fine-tuned + Huffman",
    ]
    assert record["teacher"] == str(run.dir.resolve()) and record["sparsity"] == 0.5
    by = {s["stage"]: s for s in record["stages"]}
    assert by["PyTorch sparse 50% k-means 4-bit + Huffman"]["size_bytes"] < by["PyTorch k-means 4-bit + Huffman"]["size_bytes"]
    assert "distilled from the teacher" in by["PyTorch fp32 sparse 50%"]["note"]
    model = unpack_shared((run.dir / "compressed" / by["PyTorch sparse 50% k-means 4-bit fine-tuned + Huffman"]["file"]).read_bytes())
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1:]
    assert all(abs(float((w == 0).float().mean()) - 0.5) < 0.01 for w in convs)
    out = capsys.readouterr().out
    assert "PyTorch sparse 50% k-means 4-bit fine-tuned + Huffman" in out
    assert f"int8 / fp32 onnxruntime latency at batch 64: {record['int8_latency_ratio_b64']:.3f} (the median of 2 rounds' ratios)" in out
    assert all(len(st["latency_b64_ms_rounds"]) == 2 for st in record["stages"])

    other = tmp_path / "other.npz"
    d = dict(np.load(npz_data))
    d["y_train"], d["y_test"], d["classes"] = d["y_train"] % 2, d["y_test"] % 2, d["classes"][:2]  # two classes, not three
    np.savez(other, **d)
    teacher = bonsai.fit(other, epochs=1, out=str(tmp_path / "t"), arch="resnet8", batch_size=16, quiet=True, precision="fp32", report=False)
    assert main([*args, "--teacher", str(teacher.dir)]) == 2
    assert f"{teacher.dir}: the teacher predicts 2 classes from 3-channel images" in capsys.readouterr().err
    assert main([*args[:-4], "--sparsity", "1"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert main([*args, "--rounds", "0"]) == 2
    assert "latency timing needs at least one round of one call, got rounds=0" in capsys.readouterr().err
    assert main([*args, "--calibration", "-5"]) == 2  # argparse keeps the last: before, -5 calibrated on all but 5
    assert "calibration needs at least one training image, got -5" in capsys.readouterr().err
    assert main([*args, "--lowrank", "-1"]) == 2
    assert "lowrank is the share of each conv's energy to keep, in (0, 1], got -1.0" in capsys.readouterr().err


@needs_onnx
def test_int8_pads_widths_to_16_and_measures_the_unpadded_model_too(npz_data: Path, tmp_path: Path):
    """A network with widths that are not multiples of 16 (as pruning leaves them) is quantized with zero channels
    padding them; the int8 model as trained is measured beside it, and both agree with fp32 about as well."""
    import bonsai
    from bonsai.compress.pipeline import compress

    spec = preset("resnet8", num_classes=3, image_size=16)
    spec.stages[1].width, spec.stages[1].inner = 24, [8]
    (tmp_path / "arch.json").write_text(json.dumps(spec.to_dict()))
    run = bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "r"), arch=str(tmp_path / "arch.json"), batch_size=16, quiet=True, precision="fp32", report=False)
    record = compress(run.dir, calibration=16, repeats=1, share_bits=())
    by = {s["stage"]: s for s in record["stages"]}
    assert list(by) == ["PyTorch fp32", "ONNX fp32", "ONNX int8, widths as trained", "ONNX int8", "ONNX int8 + Huffman"]
    assert "s1 24->32" in by["ONNX int8"]["note"] and "s1b0.inner 8->16" in by["ONNX int8"]["note"]
    assert by["ONNX int8"]["params"] > by["ONNX int8, widths as trained"]["params"] == by["PyTorch fp32"]["params"]
    import onnx

    graph = onnx.load(run.dir / "compressed" / "model.int8.onnx").graph
    shapes = [tuple(t.dims) for t in graph.initializer if len(t.dims) == 4 and t.dims[0] > 1]  # conv weights, not the mean/std
    assert shapes and all(s[0] % 16 == 0 for s in shapes)
    assert not (run.dir / "compressed" / "model.padded.onnx").exists()
    xv = torch.as_tensor(np.load(npz_data)["x_train"][:16]).permute(0, 3, 1, 2).contiguous()
    from bonsai.compress import onnx_export as ox

    ref = ox.ort_logits(ox.session(run.dir / "compressed" / "model.onnx"), xv)
    for f in ("model.int8.onnx", "model.int8.unpadded.onnx"):
        assert np.abs(ox.ort_logits(ox.session(run.dir / "compressed" / f), xv) - ref).max() < 0.25 * np.abs(ref).max() + 0.05


# ---- low-rank factorization ----------------------------------------------------------------------------------


def test_svd_factorization_at_full_rank_reproduces_the_conv():
    from bonsai.compress.lowrank import factorize_conv

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True)
    x = torch.randn(4, 6, 9, 9)
    pair = factorize_conv(conv, rank=54)  # clipped to min(10, 54) = 10: full rank
    with torch.no_grad():
        torch.testing.assert_close(pair(x), conv(x), rtol=1e-5, atol=1e-5)
    assert pair[0].weight.shape == (10, 6, 3, 3) and pair[1].weight.shape == (10, 10, 1, 1)


def test_finetune_after_factorizing_lowers_the_training_loss():
    from torch.nn import functional as F

    from bonsai.compress.lowrank import factorize, finetune_
    from conftest import make_images

    x, y = make_images(30)
    x, y = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y)
    torch.manual_seed(0)
    model = build(preset("resnet8", 3, 3, 16), zero_init_residual=False).eval()
    small, _ = factorize(model, x[:2], energy=0.6, timed=False)
    with torch.no_grad():
        before = float(F.cross_entropy(small.eval()(x), y))
    finetune_(small, x, y, epochs=4, lr=0.05, batch=16)
    with torch.no_grad():
        after = float(F.cross_entropy(small(x), y))
    assert after < before and not small.training


def test_rank_follows_the_energy_rule_and_a_low_rank_conv_is_recovered():
    from bonsai.compress.lowrank import factorize, factorize_conv, rank_for_energy

    assert rank_for_energy(torch.tensor([3.0, 1.0, 0.0]), 0.9) == 1  # 9 of 10
    assert rank_for_energy(torch.tensor([3.0, 1.0, 0.0]), 0.95) == 2
    assert rank_for_energy(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0) == 4
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)
    with torch.no_grad():  # a kernel of rank 4 exactly
        conv.weight.copy_((torch.randn(32, 4) @ torch.randn(4, 32 * 9)).reshape(32, 32, 3, 3))
    model = torch.nn.Sequential(conv, torch.nn.ReLU())
    x = torch.randn(2, 32, 8, 8)
    small, records = factorize(model, x, energy=0.999, timed=False)
    assert records[0]["rank"] == 4 and records[0]["replaced"] and records[0]["flops_ratio"] < 0.2
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-4, atol=1e-4)
    assert isinstance(small[0], torch.nn.Sequential) and isinstance(model[0], torch.nn.Conv2d)  # a copy was changed
    with pytest.raises(ValueError):
        factorize_conv(torch.nn.Conv2d(4, 4, 3, groups=2), 2)


# ---- weight sharing (k-means codebooks + Huffman) -------------------------------------------------------------


def test_kmeans_1d_finds_separated_clusters_and_never_leaves_one_empty():
    from bonsai.compress.sharing import kmeans_1d

    rng = np.random.default_rng(0)
    truth = np.array([-1.0, -0.2, 0.3, 2.0])
    v = np.concatenate([c + 0.01 * rng.standard_normal(500) for c in truth]).astype(np.float32)
    c, idx = kmeans_1d(v, 4)
    np.testing.assert_allclose(c, truth, atol=0.01)
    np.testing.assert_array_equal(idx, np.repeat(np.arange(4), 500))
    c, idx = kmeans_1d(np.array([0.0, 0.0, 1.0], dtype=np.float32), 16)  # more clusters than distinct values
    assert sorted(c.tolist()) == [0.0, 1.0] and idx.max() < len(c)
    c, idx = kmeans_1d(np.full(7, 0.25, dtype=np.float32), 4)  # one repeated value
    assert c.tolist() == [0.25] and idx.tolist() == [0] * 7
    c, idx = kmeans_1d(np.zeros(0, dtype=np.float32), 4)
    assert len(c) == 0 and len(idx) == 0


@pytest.mark.parametrize("bits", [2, 4, 5])
def test_weight_sharing_round_trip_uses_only_codebook_values_and_stays_close(bits: int):
    from bonsai.compress.sharing import pack_shared, unpack_shared

    torch.manual_seed(0)
    model = build(preset("resnet8", num_classes=3, image_size=16), zero_init_residual=False).eval()
    packed, stats = pack_shared(model, bits)
    back = unpack_shared(packed)
    assert back.spec.widths() == model.spec.widths()
    for (name, w), (_, w2) in zip(model.state_dict().items(), back.state_dict().items()):
        if name.endswith("weight") and w.ndim >= 2:
            assert len(torch.unique(w2)) <= 2**bits, name
            rms = float((w - w2).pow(2).mean().sqrt())
            step = float(w.max() - w.min()) / (2**bits - 1)
            assert rms <= step / 2, (name, rms, step)  # never worse than rounding to the linear grid
    assert stats["index_bits_per_weight"] <= bits + 0.01
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        ref, out = model(x), back(x)
        errs = {b: float((ref - unpack_shared(pack_shared(model, b)[0])(x)).abs().max()) for b in (1, bits - 1, bits)}
    assert errs[bits] == pytest.approx(float((ref - out).abs().max()))
    assert errs[bits] < errs[bits - 1] < errs[1] or bits == 2 and errs[2] < errs[1], "more bits, closer outputs"


def test_codebook_finetune_moves_only_the_shared_values_and_packs_exactly():
    """Trained quantization: the fine-tune lowers the loss of the k-means-shared model, keeps every weight's
    cluster (indices fixed), leaves at most 2**bits values per layer, and pack/unpack then restores it exactly."""
    from torch.nn import functional as F

    from bonsai.compress.lowrank import finetune_
    from bonsai.compress.sharing import finetune_shared_, pack_shared, unpack_shared
    from conftest import make_images

    x, y = make_images(30)
    x, y = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y)
    torch.manual_seed(0)
    model = build(preset("resnet8", 3, 3, 16), zero_init_residual=False)
    finetune_(model, x, y, epochs=8, lr=0.05, batch=16)  # a trained model, with settled BN statistics
    plain = unpack_shared(pack_shared(model, 2)[0])
    tuned = finetune_shared_(copy.deepcopy(model), 2, x, y, epochs=4, lr=0.05, batch=16)
    assert not tuned.training and not any("parametrizations" in n for n in tuned.state_dict())
    with torch.no_grad():
        assert float(F.cross_entropy(tuned(x), y)) < float(F.cross_entropy(plain(x), y))
    moved, before = 0, plain.state_dict()
    for name, w in tuned.state_dict().items():
        p = before[name]
        if name.endswith("weight") and w.ndim >= 2:
            assert len(torch.unique(w)) <= 4, name
            for v in torch.unique(p):  # the weights that shared a value before still share one
                assert len(torch.unique(w[p == v])) == 1, name
            moved += not torch.equal(torch.unique(w), torch.unique(p))
    assert moved > 0
    back = unpack_shared(pack_shared(tuned, 2)[0]).state_dict()
    for name, w in tuned.state_dict().items():
        if name.endswith("weight") and w.ndim >= 2:
            assert torch.equal(w, back[name]), name


def test_container_header_is_compressed_and_plain_json_headers_still_read():
    import struct

    from bonsai.compress.container import frame, unframe

    header = {"tensors": [{"name": f"stages.0.{i}.conv1.weight", "shape": [16, 16, 3, 3], "kind": "shared"} for i in range(50)]}
    packed = frame(b"TEST", header, b"payload")
    plain = json.dumps(header).encode()
    assert len(packed) < len(plain) / 4
    assert unframe(packed, b"TEST", "test file", "t.bin") == (header, len(packed) - len(b"payload"))
    old = b"TEST" + struct.pack("<Q", len(plain)) + plain + b"payload"  # as files were first written
    assert unframe(old, b"TEST", "test file", "t.bin") == (header, len(old) - len(b"payload"))
    bad = b"TEST" + struct.pack("<Q", 5) + b"xxxxx"
    with pytest.raises(BonsaiError, match="t.bin: damaged"):
        unframe(bad, b"TEST", "test file", "t.bin")


def test_damaged_weight_shared_file_is_a_clear_error():
    from bonsai.compress.sharing import pack_shared, unpack_shared

    packed, _ = pack_shared(build(preset("resnet8", num_classes=3, image_size=16)), 4)
    for bad in (b"XXXX" + packed[4:], packed[: len(packed) // 2], packed[:20]):
        with pytest.raises(BonsaiError, match="weight-shared|damaged"):
            unpack_shared(bad, "m.bsw")


def test_sparsify_zeros_the_smallest_share_of_each_layer_and_training_keeps_them_zero():
    from bonsai.compress.lowrank import finetune_
    from bonsai.compress.sharing import sparsify_, unshare_
    from conftest import make_images

    torch.manual_seed(0)
    model = build(preset("resnet8", 3, 3, 16), zero_init_residual=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sparsify_(model, 0.5)
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    stem, rest = layers[0], layers[1:]
    assert torch.count_nonzero(stem.weight) == stem.weight.numel()  # the stem conv is left whole
    for m in rest:
        w = m.weight.detach()
        zero = w == 0
        assert int(zero.sum()) == w.numel() // 2
        orig = before[[k for k, v in model.named_modules() if v is m][0] + ".weight"]
        assert float(orig[zero].abs().max()) <= float(orig[~zero].abs().min())  # the smallest ones went
    x, y = make_images(30)
    x, y = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y)
    masks = [m.weight.detach() == 0 for m in rest]
    finetune_(model, x, y, epochs=2, lr=0.05, batch=16)
    unshare_(model)
    assert not any("parametrizations" in n for n in model.state_dict())
    changed = 0
    for m, zero in zip(rest, masks, strict=True):
        assert torch.equal(m.weight == 0, zero)  # the same entries, still exactly zero
        changed += not torch.equal(m.weight, before[[k for k, v in model.named_modules() if v is m][0] + ".weight"] * ~zero)
    assert changed == len(rest)
    with pytest.raises(BonsaiError, match="sparsity"):
        sparsify_(model, 1.0)


def test_gradual_sparsity_rises_on_its_schedule_to_the_target_and_keeps_every_zero(monkeypatch):
    from bonsai.compress import sharing
    from conftest import make_images

    levels = sharing.sparsity_levels(0.8, 8)
    assert levels[-1] == pytest.approx(0.8) and all(b > a for a, b in zip(levels, levels[1:]))
    assert levels[0] == pytest.approx(0.8 * (1 - (7 / 8) ** 3))
    torch.manual_seed(0)
    model = build(preset("resnet8", 3, 3, 16), zero_init_residual=False)
    x, y = make_images(64)
    x, y = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y)
    rest = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][1:]
    seen: list[list[torch.Tensor]] = []
    real = sharing._keep

    def spy(w, s):  # each mask update: the zeros so far must stay among the zeros
        seen.append([(m.weight == 0).clone() for m in rest])
        return real(w, s)

    monkeypatch.setattr(sharing, "_keep", spy)
    sharing.sparsify_gradually_(model, 0.8, x, y, epochs=4, ramp=0.5, updates=4, lr=0.05, batch=16)
    monkeypatch.undo()
    sharing.unshare_(model)
    assert len(seen) == 4 * len(rest)  # the first level at the start, three updates within the ramp
    final = [m.weight == 0 for m in rest]
    for m, zero in zip(rest, final, strict=True):
        assert int(zero.sum()) == int(0.8 * m.weight.numel())
    for before in seen:
        for z0, z1 in zip(before, final, strict=True):
            assert bool((z1 | ~z0).all())  # no zero came back
    with pytest.raises(BonsaiError, match="ramp"):
        sharing.sparsify_gradually_(model, 0.5, x, y, epochs=1, ramp=0.0)


@pytest.mark.parametrize("bits", [3, 5])
def test_sparse_weight_sharing_keeps_exact_zeros_and_codes_them_cheaply(bits: int):
    """Pruned weights keep a zero centroid (index 0) through k-means, codebook fine-tuning and pack/unpack, and a
    half-zero model's indices cost fewer bits than the dense model's."""
    from bonsai.compress.sharing import codebook, finetune_shared_, pack_shared, sparsify_, unpack_shared, unshare_
    from conftest import make_images

    c, idx = codebook(np.array([0.5, 0.0, -0.25, 0.0], dtype=np.float32), 4)
    assert c[0] == 0 and (idx == 0).tolist() == [False, True, False, True] and c[idx].tolist() == [0.5, 0.0, -0.25, 0.0]
    torch.manual_seed(0)
    dense = build(preset("resnet8", 3, 3, 16), zero_init_residual=False).eval()
    model = unshare_(sparsify_(copy.deepcopy(dense), 0.5)).eval()
    x, y = make_images(30)
    x, y = torch.as_tensor(x).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(y)
    tuned = finetune_shared_(copy.deepcopy(model), bits, x, y, epochs=2, lr=0.05, batch=16)
    packed, stats = pack_shared(tuned, bits)
    back = unpack_shared(packed).state_dict()
    for name, w in model.state_dict().items():
        if name.endswith("weight") and w.ndim >= 2:
            assert torch.equal(back[name] == 0, w == 0), name
            assert torch.equal(back[name], tuned.state_dict()[name]), name  # fine-tuned values stored exactly
            assert len(torch.unique(back[name])) <= 2**bits
    assert stats["index_bits_per_weight"] < pack_shared(dense, bits)[1]["index_bits_per_weight"] - 0.5


def test_index_pairs_round_trip_and_reject_a_wrong_count():
    from bonsai.compress.sharing import _pair, _unpair

    for n in (0, 1, 2, 7):
        idx = np.random.default_rng(n).integers(0, 16, n).astype(np.uint8)
        assert np.array_equal(_unpair(_pair(idx), n), idx)
    with pytest.raises(BonsaiError, match="pairs"):
        _unpair(_pair(np.zeros(4, dtype=np.uint8)), 7)


def test_batchnorm_is_stored_as_scale_and_shift_with_the_same_outputs():
    from bonsai.compress.sharing import _folded_bn, pack_shared, unpack_shared

    torch.manual_seed(0)
    model = build(preset("resnet8", 3, 3, 16), zero_init_residual=False).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.1, 3), m.weight.data.uniform_(0.5, 2), m.bias.data.uniform_(-1, 1)
    folded = copy.deepcopy(model)
    folded.load_state_dict({k: torch.full_like(model.state_dict()[k], v) if isinstance(v, float) else v for k, v in _folded_bn(model, model.state_dict()).items()})
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
        back = unpack_shared(pack_shared(model, 8)[0])
        assert all(float(m.running_mean.abs().max()) == 0 for m in back.modules() if isinstance(m, torch.nn.BatchNorm2d))
        ref = model(x)
        err = float((back(x) - ref).abs().max())
    assert err < 0.05 * float(ref.abs().max())  # 8-bit codebooks and float16 scale and shift
