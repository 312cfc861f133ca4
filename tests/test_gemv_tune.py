"""Launches tuned for a GPU (quant/gemv.py's tuned files, quant/gemv_tune.py, `moe-offload tune`).

Without a GPU the kernel runs interpreted on CPU tensors (tests/conftest.py), whose tuned launches are filed under
the device name "cpu"; a stand-in timer replaces CUDA's. tests/conftest.py gives each test empty tuned folders.
"""

import itertools
import json

import pytest
import torch

from cli.app import main
from offload.synth import synthesize
from offload.tune import NO_GPU, tune_model
from quant import gemv, gemv_tune
from quant.errors import MoEOffloadError
from quant.hqq import EXPERT_PRESETS, dequantize, random_quantized

# interpreted on the CPU: with CUDA, the compiled kernel's device name would file the launches
pytestmark = pytest.mark.skipif(gemv.triton is None or torch.cuda.is_available(), reason="no Triton, or CUDA")
CPU = torch.device("cpu")
SPEC = EXPERT_PRESETS["2"]  # 2-bit g16, 8-bit meta: the packed-row kernel
SHAPE = (64, 256)
TUNED = dict(block_n=4, block_k=1024, num_warps=2, split_k=2, late_sum=False, fast_codes=True, stages=1,
             mantissa_codes=False, early_meta=not gemv.EARLY_META)  # fmt: skip


def write_tuned(folder, launches: dict, device: str = "cpu") -> None:
    (folder / gemv.tuned_file_name(device)).write_text(json.dumps({"device": device, "launches": launches}))


class Spy:
    """Stands in for a Triton kernel: records each launch's keywords, then launches the kernel."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        def run(*args, **keywords):
            self.launches.append({**keywords, "grid": grid})
            return self.kernel[grid](*args, **keywords)

        return run


def test_gemv_launches_the_tuned_launch_for_its_shape_and_dtype(tuned_folders, monkeypatch):
    """A tuned file for this device: gemv launches its launch for that shape and x's dtype, keywords given still
    win, other shapes and dtypes keep the defaults, and USE_TUNED off (the benchmarks') ignores the file."""
    _, user = tuned_folders
    write_tuned(user, {gemv.tuning_key(SPEC, SHAPE, torch.float32): {**TUNED, "us": 1.0}})
    spy = Spy(gemv._gemv_packed_kernel)
    monkeypatch.setattr(gemv, "_gemv_packed_kernel", spy)
    q = random_quantized(SHAPE, SPEC, torch.Generator().manual_seed(0))
    x = torch.randn(1, SHAPE[1], generator=torch.Generator().manual_seed(1))
    expected = x.double() @ dequantize(q, torch.float32).double().T
    got = gemv.gemv(x, q)
    assert (got.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
    launched = spy.launches[-1]
    assert (launched["BLOCK_N"], launched["BLOCK_K"], launched["num_warps"]) == (4, 1024, 2)
    assert launched["SPLIT_K"] == 2 and launched["grid"] == (SHAPE[0] // 4 // 4, 1, 2)  # 16 packed rows, 4 a program
    assert launched["EARLY_META"] is TUNED["early_meta"]
    assert (launched["LATE_SUM"], launched["FAST_CODES"], launched["STAGES"], launched["MANTISSA_CODES"]) == (
        False, True, 1, False)  # fmt: skip
    assert gemv.launch(x, q) == TUNED
    assert gemv.launch(x, q, block_k=512, stages=3) == {**TUNED, "block_k": 512, "stages": 3}
    defaults = dict(zip(gemv.LAUNCH, (*gemv.PACKED_LAUNCH[2], gemv.SPLIT_K, *gemv.default_variant(q), gemv.EARLY_META),
                        strict=True))  # fmt: skip
    assert gemv.launch(x.double(), q) == defaults  # another dtype
    other = random_quantized((128, 256), SPEC)
    assert gemv.launch(x, other) == defaults  # another shape
    monkeypatch.setattr(gemv, "USE_TUNED", False)
    assert gemv.launch(x, q) == defaults


def test_the_users_tuned_launch_wins_over_the_packages(tuned_folders):
    shipped, user = tuned_folders
    key, other = gemv.tuning_key(SPEC, SHAPE, torch.float32), gemv.tuning_key(SPEC, (128, 256), torch.float32)
    write_tuned(shipped, {key: {**TUNED, "block_n": 1}, other: {**TUNED, "block_n": 8}})
    write_tuned(user, {key: TUNED})
    assert gemv.tuned_launches(CPU) == {key: TUNED, other: {**TUNED, "block_n": 8}}
    assert gemv.tuning_key(SPEC, SHAPE, torch.bfloat16) == "2-bit g16, 8-bit meta g128 64x256 bfloat16"
    assert gemv.tuned_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{", None),
        ('{"device": "cpu"}', "no launches"),
        ('{"device": "Tesla T4", "launches": {}}', "tuned on 'Tesla T4', not on this 'cpu'"),
        (json.dumps({"device": "cpu", "launches": {"k": {**TUNED, "block_k": 1000}}}),
         "block_k is 1000, not a positive whole number, a power of two"),
        (json.dumps({"device": "cpu", "launches": {"k": {**TUNED, "split_k": 3}}}),
         "split_k is 3, not a positive whole number, a power of two"),
        (json.dumps({"device": "cpu", "launches": {"k": {**TUNED, "late_sum": 1}}}),
         "late_sum is 1, not true or false"),
        (json.dumps({"device": "cpu", "launches": {"k": {k: v for k, v in TUNED.items() if k != "early_meta"}}}),
         "early_meta is None, not true or false"),
        (json.dumps({"device": "cpu", "launches": {"k": {**TUNED, "stages": None}}}),
         "stages is None, not a positive whole number"),
    ],
)  # fmt: skip
def test_a_tuned_file_gemv_cannot_use_is_a_one_line_error(tuned_folders, content, why):
    _, user = tuned_folders
    path = user / "cpu.json"
    path.write_text(content)
    with pytest.raises(MoEOffloadError) as raised:
        gemv.tuned_launches(CPU)
    if why is None:
        assert str(raised.value).startswith(f"{path}: cannot read tuned GEMV launches (")
        assert str(raised.value).endswith("); delete it, or run `moe-offload tune` again")
    else:
        assert str(raised.value) == (f"{path} is not a tuned GEMV file for this GPU: {why}; delete it, or run "
                                     "`moe-offload tune` again")  # fmt: skip


@pytest.mark.parametrize("cannot", ["OutOfResources", "PTXASError"])
def test_tuning_keeps_the_fastest_launch_whose_result_agrees(monkeypatch, cannot):
    """tune_shape on the interpreter with a stand-in timer: the fastest variant, the fastest launch shape, the
    fastest split of K there, the meta ahead of the codes or after, then the variants again there. block_n 4 at
    block_k 512 cannot launch; 4 warps at 2048 give a wrong result, and are never chosen, however fast. Each launch
    is tried once."""
    monkeypatch.setattr(gemv_tune, "LAUNCH_SHAPES", {True: ((2, 4), (512, 2048), (2, 4))})
    original = gemv.gemv

    def flawed(x, q, out=None, workspace=None, **launch):  # 4 warps at 2048: wrong; block_n 4 at 512: no launch
        if launch["block_k"] == 512 and launch["block_n"] == 4:
            errors = gemv.triton.runtime.errors
            raise errors.OutOfResources(1, 0, "shared memory") if cannot == "OutOfResources" else errors.PTXASError(
                "ptxas fatal: an error of ptxas's own")  # fmt: skip
        y = original(x, q, out, workspace, **launch)
        return y + 1 if launch["block_k"] == 2048 and launch["num_warps"] == 4 else y

    def timer(calls):  # each variant's own time; block_n 4 and block_k 2048 the fastest shape; 4 programs a K
        launch = calls[0].keywords
        variant = 5 * (not launch["late_sum"]) + 1 * launch["mantissa_codes"] + 0.5 * (launch["stages"] == 3)
        return (
            100
            - variant
            - 0.25 * launch["fast_codes"]
            - 10 * (launch["block_k"] == 2048)
            - 50 * (launch["block_n"] == 4)
            - 3 * (launch["split_k"] == 4)
            - 2 * launch["early_meta"]
        )

    monkeypatch.setattr(gemv, "gemv", flawed)
    q = random_quantized(SHAPE, SPEC, torch.Generator().manual_seed(0))
    x = torch.randn(1, SHAPE[1], generator=torch.Generator().manual_seed(1))
    seen = []
    result = gemv_tune.tune_shape([q], x, timer, seen.append)
    default = gemv.launch(x, q)
    assert (default["block_n"], default["block_k"], default["late_sum"], default["mantissa_codes"]) == (
        2,
        512,
        True,
        True,
    )
    assert result["default_us"] == (100 - 1 - 0.5 * (default["stages"] == 3) - 0.25 * default["fast_codes"]
                                    - 2 * default["early_meta"])  # fmt: skip
    assert result["launch"] == {**default, "late_sum": False, "block_n": 4, "block_k": 2048, "num_warps": 2,
                                "split_k": 4, "early_meta": True}  # fmt: skip
    assert result["us"] == result["default_us"] - 5 - 10 - 50 - 3 - 2 * (not default["early_meta"])
    timings = {tuple(t[key] for key in gemv.LAUNCH): t["us"] for t in result["timings"]}
    assert len(timings) == len(result["timings"])  # each once
    wrong = {**default, "late_sum": False, "block_n": 4, "block_k": 2048, "num_warps": 4}
    unlaunched = {**default, "late_sum": False, "block_n": 4, "block_k": 512, "num_warps": 2}
    assert timings[tuple(wrong.values())] is None and timings[tuple(unlaunched.values())] is None
    late_sum = {v["late_sum"]: timings[tuple({**default, **v}.values())] for v in gemv_tune.variants(q)
                if {**default, **v, "late_sum": True} == default}  # fmt: skip
    assert late_sum == {True: result["default_us"], False: result["default_us"] - 5}
    assert seen == list(range(1, len(timings) + 1))
    shapes = {(t["block_n"], t["block_k"], t["num_warps"]) for t in result["timings"]}
    assert shapes == set(itertools.product((2, 4), (512, 2048), (2, 4)))
    at_best = [t for t in result["timings"] if (t["block_n"], t["block_k"], t["num_warps"]) == (4, 2048, 2)]
    assert {t["split_k"] for t in at_best} == {1, *gemv_tune.SPLITS}  # every split at the shape found
    at_split = [t for t in at_best if t["split_k"] == 4]
    assert {t["early_meta"] for t in at_split} == {False, True}  # the meta ahead and after, at the split found
    at_early = [t for t in at_split if t["early_meta"]]
    assert len(at_early) == len(gemv_tune.variants(q))  # every variant again at the launch found


def test_tuning_keeps_the_default_where_nothing_beats_it(monkeypatch):
    monkeypatch.setattr(gemv_tune, "LAUNCH_SHAPES", {True: ((2,), (512,), (2, 4))})
    monkeypatch.setattr(gemv_tune, "VARIANTS", gemv_tune.VARIANTS[:2])
    q = random_quantized(SHAPE, SPEC, torch.Generator().manual_seed(0))
    x = torch.randn(1, SHAPE[1])
    result = gemv_tune.tune_shape([q], x, lambda calls: 7.0)
    assert result["launch"] == gemv.launch(x, q) and result["us"] == result["default_us"] == 7.0


def test_gated_pairs_are_tuned_and_launched_apart_from_their_matrices(tuned_folders, monkeypatch):
    """tune_shape on w1 and w3 pairs times gemv.gated, from gated's own default (GATED_EARLY_META); saved under the
    pair's key, its launch is the one gated runs, while gemv keeps the default for each matrix of that shape."""
    monkeypatch.setattr(gemv_tune, "LAUNCH_SHAPES", {True: ((1, 2), (512,), (2,))})
    monkeypatch.setattr(gemv_tune, "VARIANTS", [(True, True, 1, True)])
    monkeypatch.setattr(gemv_tune, "SPLITS", (2,))
    generator = torch.Generator().manual_seed(3)
    pairs = [(random_quantized(SHAPE, SPEC, generator), random_quantized(SHAPE, SPEC, generator)) for _ in range(2)]
    x = torch.randn(1, SHAPE[1], generator=generator)
    timed = []

    def timer(calls):  # block_n 1 and K split in two: the fastest
        timed.append([call.args[1] for call in calls])
        return 10.0 - (calls[0].keywords["block_n"] == 1) - (calls[0].keywords["split_k"] == 2)

    result = gemv_tune.tune_shape(pairs, x, timer)
    default = gemv.launch(x, pairs[0][0], tuned=False, gated=True)
    assert default["early_meta"] is gemv.GATED_EARLY_META and result["default_us"] == 10.0
    assert result["launch"] == {**default, "block_n": 1, "split_k": 2} and result["us"] == 8.0
    assert all(taken == pairs for taken in timed)  # every timing takes the pairs in turn
    key = gemv.tuning_key(SPEC, SHAPE, torch.float32, gated=True)
    assert key == "gated 2-bit g16, 8-bit meta g128 64x256 float32"
    gemv_tune.save({key: {**result, "matrices": ["experts.w1+w3"]}}, CPU, {})
    spy = Spy(gemv._gemv_packed_kernel)
    monkeypatch.setattr(gemv, "_gemv_packed_kernel", spy)
    w1, w3 = pairs[0]
    gemv.gated(x, w1, w3)
    assert (spy.launches[-1]["GATED"], spy.launches[-1]["BLOCK_N"], spy.launches[-1]["SPLIT_K"]) == (True, 1, 2)
    gemv.gemv(x, w1)
    assert (spy.launches[-1]["GATED"], spy.launches[-1]["BLOCK_N"]) == (False, gemv.PACKED_LAUNCH[2][0])


def test_tune_model_tunes_each_kernel_shape_and_gemv_then_launches_it(tmp_path, tuned_folders, monkeypatch):
    """`tune` on a tiny synthetic model: each distinct shape of its experts (2-bit) and attention (4-bit) tuned
    once, saved in the user's folder with what the run recorded, and launched by gemv from then on; a second tune
    keeps the first's other shapes."""
    _, user = tuned_folders
    model = synthesize(tmp_path / "tiny", "tiny")
    monkeypatch.setattr(gemv_tune, "LAUNCH_SHAPES", {True: ((1, 2), (512,), (2,)), False: ((16,), (256,), (4,))})
    monkeypatch.setattr(gemv_tune, "VARIANTS", [(True, True, 1, True), (False, True, 1, False)])

    def timer(calls):  # block_n 1 and late sum off: the fastest
        return 10.0 - 2 * (calls[0].keywords["block_n"] == 1) - (not calls[0].keywords["late_sum"])

    seen = []
    tuned = tune_model(str(model), device="cpu", dtype="float32", timer=timer, about={"command": "test"},
                       progress=lambda *args: seen.append(args))  # fmt: skip
    pair, w2, w1 = (f"{prefix}2-bit g16, 8-bit meta g128 {n}x{k} float32"
                    for prefix, (n, k) in (("gated ", (256, 128)), ("", (128, 256)), ("", (256, 128))))  # fmt: skip
    attention = [f"4-bit g64 {n}x{k} float32" for n, k in ((64, 128), (128, 128))]
    assert list(tuned.results) == [pair, w2, w1, *attention]  # decode's expert shapes first
    assert tuned.device == "cpu" and tuned.dtype == "float32"
    keys = set(tuned.results)
    assert seen[0] == (f"{pair}: 1 launch", 0, 5) and seen[-1] == (attention[-1], 5, 5)
    assert tuned.results[pair]["matrices"] == ["experts.w1+w3"]
    assert tuned.results[w1]["matrices"] == ["experts.w1", "experts.w3"]
    assert tuned.results["4-bit g64 64x128 float32"]["matrices"] == [f"layers.{i}.{p}" for i in range(4)
                                                                     for p in ("k_proj", "v_proj")]  # fmt: skip
    assert tuned.path == user / "cpu.json"
    record = json.loads(tuned.path.read_text())
    assert record["device"] == "cpu" and record["command"] == "test" and set(record["timings"]) == keys
    w2 = random_quantized((128, 256), SPEC)
    assert gemv.launch(torch.zeros(1, 256), w2) == dict(block_n=1, block_k=512, num_warps=2, split_k=1, late_sum=False,
                                                        fast_codes=True, stages=1, mantissa_codes=False,
                                                        early_meta=gemv.EARLY_META)  # fmt: skip
    gemv_tune.save({w1: tuned.results[w1]}, CPU, {})
    assert set(json.loads(tuned.path.read_text())["launches"]) == keys


def test_an_interrupted_tune_keeps_the_shapes_it_finished(tmp_path, tuned_folders, monkeypatch):
    """Each shape is saved as it is done: Ctrl-C (or a session's time limit) in the second shape leaves the first's
    launch in the file, and gemv runs it; `tune` then exits 130 and says so. A model whose matrices the kernel
    serves none of is a one-line error."""
    _, user = tuned_folders
    model = synthesize(tmp_path / "tiny", "tiny")
    monkeypatch.setattr(gemv_tune, "LAUNCH_SHAPES", {True: ((1, 2), (512,), (2,)), False: ((16,), (256,), (4,))})
    monkeypatch.setattr(gemv_tune, "VARIANTS", [(True, True, 1, True)])
    monkeypatch.setattr(gemv_tune, "SPLITS", ())
    keys = []

    def timer(calls):  # block_n 1 the fastest; the second shape is interrupted
        m = calls[0].args[1]  # a matrix, or gated's pair
        q = m[0] if isinstance(m, tuple) else m
        key = gemv.tuning_key(q.spec, tuple(q.shape), torch.float32, isinstance(m, tuple))
        if key not in keys:
            keys.append(key)
        if len(keys) == 2:
            raise KeyboardInterrupt
        return 10.0 - (calls[0].keywords["block_n"] == 1)

    with pytest.raises(KeyboardInterrupt):
        tune_model(str(model), device="cpu", dtype="float32", timer=timer)
    launches = gemv.tuned_launches(CPU)
    assert list(launches) == keys[:1] and launches[keys[0]]["block_n"] == 1
    assert json.loads((user / "cpu.json").read_text())["launches"][keys[0]]["us"] == 9.0
    monkeypatch.setattr(gemv, "supports", lambda x, q: False)
    with pytest.raises(MoEOffloadError) as raised:
        tune_model(str(model), device="cpu", dtype="float32", timer=timer)
    assert str(raised.value) == (f"the kernel serves none of {model}'s quantized matrices (quant/gemv.py, supports): "
                                 "nothing to tune")  # fmt: skip


def test_tune_interrupted_says_what_it_kept(tmp_path, monkeypatch, capsys):
    import offload.tune

    model = synthesize(tmp_path / "tiny", "tiny")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(offload.tune, "tune_model", interrupted)
    assert main(["tune", str(model)]) == 130
    assert capsys.readouterr().err.endswith("(interrupted: the shapes tuned before it are saved, and decode runs "
                                            "them; the others keep the built-in launches until a tune runs to the "
                                            "end)\n")  # fmt: skip


def test_tune_replaces_a_tuned_file_it_cannot_read(tuned_folders):
    _, user = tuned_folders
    (user / "cpu.json").write_text("{")
    result = {"launch": TUNED, "us": 1.0, "default_us": 2.0, "matrices": ["w"], "timings": []}
    with pytest.warns(UserWarning, match="^replacing it: .*cpu.json: cannot read tuned GEMV launches"):
        gemv_tune.save({"k": result}, CPU, {})
    assert gemv.tuned_launches(CPU) == {"k": TUNED}


def test_tune_without_a_gpu_says_so(tmp_path, capsys):
    model = synthesize(tmp_path / "tiny", "tiny")
    for device in ("auto", "cpu"):
        assert main(["tune", str(model), "--device", device]) == 2
        assert capsys.readouterr().err == f"error: {NO_GPU}\n"


def test_info_says_tuned_where_every_expert_shape_is(tmp_path, tuned_folders, monkeypatch):
    """`info` and `bench` name the Triton kernel ", tuned" once decode's expert shapes all have a tuned launch: w1
    and w3 as gated's pair, and w2; or with GATED off, w1 alone and w2."""
    import offload.api
    from quant.linear import TRITON

    _, user = tuned_folders
    model = synthesize(tmp_path / "tiny", "tiny")
    monkeypatch.setattr(offload.api, "decode_kernel", lambda fused, device: TRITON)  # as on CUDA
    prepared = offload.api.prepare(str(model), device="cpu", dtype="float32")
    w1, w2 = (gemv.tuning_key(SPEC, shape, torch.float32) for shape in ((256, 128), (128, 256)))
    pair = gemv.tuning_key(SPEC, (256, 128), torch.float32, gated=True)
    tuned = f"{TRITON.name}, tuned"
    cases = [(True, {pair: TUNED}, TRITON.name), (True, {w1: TUNED, w2: TUNED}, TRITON.name),
             (True, {pair: TUNED, w2: TUNED}, tuned), (False, {w1: TUNED, w2: TUNED}, tuned)]  # fmt: skip
    for gated, launches, name in cases:
        monkeypatch.setattr(gemv, "GATED", gated)
        write_tuned(user, launches)
        gemv.forget_tuned()
        assert offload.api.describe(prepared)["decode kernel"] == name


def test_tune_leaves_out_a_gated_pair_whose_first_try_fails(monkeypatch):
    """Where gated's first try fails on this GPU (gemv.gated_first_try: decode then launches w1 and w3 apart), tune
    tunes the single matrices and not the pair, rather than failing on it."""
    monkeypatch.setattr(gemv_tune, "LAUNCH_SHAPES", {True: ((2,), (512,), (2,))})
    monkeypatch.setattr(gemv_tune, "VARIANTS", gemv_tune.VARIANTS[:1])
    monkeypatch.setattr(gemv_tune, "SPLITS", ())
    tried = []
    monkeypatch.setattr(gemv, "gated_first_try", lambda device, dtype, spec, shape, rows: tried.append(shape) or "no")
    shapes = {"w1+w3": gemv_tune.Shape(SPEC, SHAPE, gated=True), "w1": gemv_tune.Shape(SPEC, SHAPE)}
    results = gemv_tune.tune(shapes, CPU, torch.float32, timer=lambda calls: 1.0)
    assert list(results) == [gemv.tuning_key(SPEC, SHAPE, torch.float32)] and tried == [SHAPE]


def test_launches_by_packed_row_are_tuned_and_filed_apart_from_grid_orders(tmp_path, tuned_folders, monkeypatch):
    """Meta by packed row is another loop of the kernel (gemv.META_ROWS): a tune with meta_rows times the experts' w1
    and w3 held so (kernel_shapes: w2, 4 groups an output, cannot be) and files their launches under "..., meta by
    row"; gemv launches such a launch for a matrix held by row, and not for one in grid order, nor the other way."""
    from offload.convert import open_source
    from offload.tune import kernel_shapes
    from quant.packing import has_meta_by_row, with_meta_by_row
    from tests.tiny import make_tiny_mixtral

    source = open_source(str(make_tiny_mixtral(tmp_path / "m", hidden=2048, intermediate=64, layers=1, experts=4)),
                         expert_bits="2")  # fmt: skip
    for order, rows in (("row", True), ("grid", False)):
        shapes = kernel_shapes(source, torch.float32, order)
        held = [shapes[f"experts.{name}"].meta_rows for name in ("w1+w3", "w2", "w1", "w3")]
        assert held == [rows, False, rows, rows]
    monkeypatch.setattr(gemv_tune, "LAUNCH_SHAPES", {True: ((2,), (512,), (2,))})
    monkeypatch.setattr(gemv_tune, "VARIANTS", gemv_tune.VARIANTS[:1])
    monkeypatch.setattr(gemv_tune, "SPLITS", ())
    shape, timed = (64, 2048), []

    def timer(calls: list) -> float:  # which order each launch was timed on
        timed.append({has_meta_by_row(call.args[1]) for call in calls})
        return 1.0

    shapes = {"w1": gemv_tune.Shape(SPEC, shape, meta_rows=True), "w3": gemv_tune.Shape(SPEC, shape)}
    results = gemv_tune.tune(shapes, CPU, torch.float32, timer=timer)
    rows, grid = (gemv.tuning_key(SPEC, shape, torch.float32, meta_rows=rows) for rows in (True, False))
    assert rows == "2-bit g16, 8-bit meta g128 64x2048 float32, meta by row" and list(results) == [rows, grid]
    assert results[rows]["matrices"] == ["w1"] and results[grid]["matrices"] == ["w3"]
    assert timed[0] == {True} and timed[-1] == {False} and timed.count({True}) + timed.count({False}) == len(timed)
    _, user = tuned_folders
    write_tuned(user, {rows: TUNED})
    gemv.forget_tuned()
    q = random_quantized(shape, SPEC, torch.Generator().manual_seed(0))
    x = torch.randn(1, shape[1])
    assert gemv.launch(x, with_meta_by_row(q)) == TUNED and gemv.launch(x, q) == gemv.launch(x, q, tuned=False)
    write_tuned(user, {grid: TUNED})
    gemv.forget_tuned()
    assert gemv.launch(x, q) == TUNED and gemv.launch(x, with_meta_by_row(q)) == gemv.launch(x, q, tuned=False)


def test_info_says_tuned_for_experts_by_packed_row_only_with_their_own_launches(tmp_path, tuned_folders, monkeypatch):
    """Experts held by packed row (meta_rows) run the launches tuned for that layout: grid order's tuned launches for
    the same shapes do not make `info` say ", tuned"; theirs for w1 and w3's pair, with w2's (in grid order: 4 groups
    an output), do."""
    import offload.api
    from quant.linear import TRITON
    from tests.tiny import make_tiny_mixtral

    _, user = tuned_folders
    tiny = make_tiny_mixtral(tmp_path / "m", hidden=2048, intermediate=64, layers=1, experts=4)
    monkeypatch.setattr(offload.api, "decode_kernel", lambda fused, device: TRITON)  # as on CUDA
    monkeypatch.setattr(offload.api, "meta_order", lambda meta_rows, device, fused: "row")  # as with meta_rows there
    prepared = offload.api.prepare(str(tiny), device="cpu", dtype="float32", expert_bits="2")
    assert prepared.expert_format.meta_order == "row"
    w2 = gemv.tuning_key(SPEC, (2048, 64), torch.float32)
    pairs = {
        rows: gemv.tuning_key(SPEC, (64, 2048), torch.float32, gated=True, meta_rows=rows) for rows in (True, False)
    }
    for rows, name in ((False, TRITON.name), (True, f"{TRITON.name}, tuned")):
        write_tuned(user, {pairs[rows]: TUNED, w2: TUNED})
        gemv.forget_tuned()
        assert offload.api.describe(prepared)["decode kernel"] == name
