#!/usr/bin/env bash
# Issue 5's GPU figures, in as few calls to a lent GPU machine as possible.
#
#   here (with the network):  bash benchmarks/gpu_session.sh prepare
#       puts the wheels of hqq, termcolor and bitsandbytes, the Mixtral routing trace and the commit into .gpu/
#       (git-ignored); run it again before each session, since every result is stamped with that commit
#   on the GPU machine:       bash benchmarks/gpu_session.sh STEP [STEP ...]     (carry .gpu)
#       steps: synth-start tests attention copy-engine kernel kernel-sweep ncu synth tune tune-rows bench bench-rows bench-more bench-path embedding prefill colab profile; results go to $OUT (the device's) or benchmarks/results
#   between calls: launches `tune` found (its gemv_tuned_GPU.json) put in .gpu/gemv_tuned/ are installed at the start of
#       each later call, and the bench results' names then say _tuned
#
# The machine's image has torch (CUDA), Triton, transformers, typer, rich and safetensors; hqq,
# termcolor and bitsandbytes are carried.
# synth writes 18 GB to /tmp/m8x7b and takes minutes: run synth, bench and colab in one call. Each call is likely a
# fresh machine (it is given back 30 s after a call), so each starts with synth-start. A call brings back at
# most 8 files from $OUT: the synth log stays in /tmp. Loads after synth skip the sha256 check (--no-verify,
# 20-40 s each on 18 GB): the folder was written a minute ago by the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == prepare ]]; then
    python=.venv/bin/python  # the project's venv (README's install), which has the bitsandbytes the tests ran
    [[ -x $python ]] || { echo "prepare: no $python; install the project first (README)" >&2; exit 2; }
    bnb=$($python -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))')
    # afresh (two wheels of one package would break the install on the GPU), into .gpu.new, which replaces .gpu
    # only once every file is there: a failed download leaves the last good .gpu, not an empty one
    rm -rf .gpu.new && mkdir -p .gpu.new
    mkdir -p .git/info && for ignored in /.gpu/ /.gpu.new/; do
        grep -qx "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >>.git/info/exclude
    done
    $python -m pip wheel --no-deps -q -w .gpu.new hqq==0.2.8  # an sdist only on PyPI: build the (pure) wheel here
    $python -m pip download --no-deps -q -d .gpu.new termcolor  # hqq imports it; the image lacks it
    # NF4 attention (--attn-quant bnb) and its tests: the image has no bitsandbytes (43 MB; the carry's limit is 64 MiB)
    $python -m pip download --no-deps -q -d .gpu.new --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 bitsandbytes=="$bnb"
    cp ../shared/traces/mixtral-8x7b-instruct_humaneval_routing.jsonl .gpu.new/
    git rev-parse HEAD >.gpu.new/COMMIT
    # each tracked file's sum, which the GPU machine checks: its results name COMMIT, and the tree sent is the tree
    # as it is at each call
    git ls-files -z | xargs -0 sha256sum >.gpu.new/TREE.sha256
    [[ -d .gpu/gemv_tuned ]] && cp -r .gpu/gemv_tuned .gpu.new/  # launches a call tuned this session: kept
    if [[ -n $(git status --porcelain --untracked-files=no) ]]; then
        echo "prepare: warning: uncommitted changes; the results will name $(cat .gpu.new/COMMIT)" >&2
    fi
    rm -rf .gpu && mv .gpu.new .gpu
    ls -la .gpu
    exit 0
fi

results=${OUT:-benchmarks/results}
mkdir -p "$results"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")  # e.g. h100
trace=.gpu/mixtral-8x7b-instruct_humaneval_routing.jsonl
model=/tmp/m8x7b
nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max --format=csv || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
echo "commit $(cat .gpu/COMMIT)"
if [[ -f .gpu/TREE.sha256 ]] && ! sha256sum --quiet -c .gpu/TREE.sha256 >/dev/null 2>&1; then
    echo "WARNING: the tree sent differs from commit $(cat .gpu/COMMIT), which the results will name:" \
        "run prepare again after committing" >&2
    sha256sum --quiet -c .gpu/TREE.sha256 2>&1 | head -5 >&2 || true
fi
df -h /tmp || true  # synth writes 18.4 GB there, and refuses to start if the disk says it cannot hold it

# launches tuned for this GPU, carried from an earlier call: installed where gemv reads them (quant/gemv.py)
tuned=  # "_tuned" once they are: the names of the model's results say so
# only where they are this GPU's: a call that the run tool moved to another kind (an H200) runs the built-in ones
if compgen -G ".gpu/gemv_tuned/*.json" >/dev/null && python3 - <<'EOF'; then
import glob, json, shutil, sys
import torch
from quant import gemv
here = gemv.device_name(torch.device("cuda"))
for path in glob.glob(".gpu/gemv_tuned/*.json"):
    device = json.load(open(path))["device"]
    gemv.user_tuned_folder().mkdir(parents=True, exist_ok=True)
    shutil.copy(path, gemv.user_tuned_file(device))
    print(f"tuned launches for {device}: {path}")
sys.exit(None if gemv.user_tuned_file(here).exists() else f"no tuned launches for this GPU, {here}")
EOF
    tuned=_tuned
fi

moe() { python3 -m cli.app "$@"; }
no_model=  # set when synth failed: the steps that read the model skip, the others still run
bench() {  # every load after synth: see the header
    [[ -z $no_model ]] || { echo "== skipped (no model): bench $*"; return 1; }
    moe bench "$model" --no-verify "$@"
}
profile() {
    [[ -z $no_model ]] || { echo "== skipped (no model): profile $*"; return 1; }
    python3 benchmarks/profile_decode.py "$model" --no-verify "$@"
}
attempt() {  # a run that fails (the first on a new machine, say) is reported, and the runs after it still run
    "$@" || echo "== failed with exit code $?: $*"
}
# The run tool kills a call at 600 s, before the EXIT trap below, and a file a step writes at its end is then lost:
# a step that may run long is given what is left of the call, less a margin for the files' return
CALL_SECONDS=${CALL_SECONDS:-570}
limited() {  # limited SECONDS COMMAND...: COMMAND under a time limit of SECONDS, or of what is left of the call
    local limit=$1 left=$((CALL_SECONDS - SECONDS))
    shift
    ((left >= 20)) || { echo "== no time left in the call for: $*"; return 124; }
    ((left < limit)) && limit=$left
    timeout -k 10 "$limit" "$@"
}

stamp() {  # the machine's copy has the session's first commit in .git, or none: record the commit sent
    python3 - "$@" <<'EOF'
import json, os, sys
commit = open(".gpu/COMMIT").read().strip()
for path in filter(os.path.exists, sys.argv[1:]):  # a step that failed wrote nothing (or left a glob unmatched)
    data = json.load(open(path))
    data["commit"] = commit
    json.dump(data, open(path, "w"), indent=2)
EOF
}
if [[ -n ${OUT:-} ]]; then  # a call cut short at its time limit: its last step's results still name the commit sent,
    # and a write killed midway leaves no temporary file to count against the call's 8
    trap 'rm -f "$results"/.*.tmp; stamp "$results"/*.json' EXIT
fi

for step in "$@"; do
    echo "== $step $(date +%T)"
    case $step in
    tests)
        # a failure is reported, not fatal: the steps after it still run. -vv against pyproject's -q: a line per test
        # as it ends, so a run cut off at its limit (before pytest's summary) still names what passed and failed
        # at most 4 minutes: a hang (in a teardown never run on a GPU, say) must not take the call's other steps
        limited 240 python3 -m pytest -vv -rs tests/test_cuda.py tests/test_gemv.py tests/test_graphs.py tests/test_embedding.py tests/test_norm.py tests/test_rope.py tests/test_router.py 2>&1 | tee "$results/cuda_tests_$gpu.log" ||
            echo "== tests failed: see $results/cuda_tests_$gpu.log"
        ;;
    attention)  # a decode step's attention, grouped query heads against each head with enable_gqa: which kernel is
        # faster here and what each holds, eager and in the static step's masked form (seconds; no model needed)
        attempt limited 120 python3 benchmarks/decode_attention.py --out "$results/decode_attention_$gpu.json"
        stamp "$results/decode_attention_$gpu.json"
        ;;
    copy-engine)  # whether a decode step's few-byte copies wait behind an expert load (seconds; after synth, whose
        # writes would disturb microsecond timings; a failure does not stop the steps after it)
        if python3 benchmarks/copy_engine.py --out "$results/copy_engine_$gpu.json"; then
            stamp "$results/copy_engine_$gpu.json"
        else
            echo "== copy-engine failed"
        fi
        ;;
    kernel)  # device time per call, every variant (late_sum, fast_codes, stages, mantissa_codes) at the default launch
        attempt limited 240 python3 benchmarks/gemv_kernel.py --variants --out "$results/gemv_kernel_$gpu.json"
        stamp "$results/gemv_kernel_$gpu.json"
        ;;
    ncu)  # the GEMV kernels' hardware counters under Nsight Compute: what they wait on (no model needed; ncu reads
        # counters on the H100's Firecracker machines). At most 5 minutes, so that a hang leaves the call's other steps
        attempt limited 300 python3 benchmarks/gemv_ncu.py --out "$results/gemv_ncu_$gpu.json"
        stamp "$results/gemv_ncu_$gpu.json"
        ;;
    kernel-sweep)  # every 2-bit launch shape of the default variant (of all 8: ~600 compiles, past a call's 10 minutes)
        attempt limited 600 python3 benchmarks/gemv_kernel.py --sweep --sweep-bits 2 --out "$results/gemv_kernel_sweep_$gpu.json"
        stamp "$results/gemv_kernel_sweep_$gpu.json"
        ;;
    tune)  # the kernel's fastest launch for each of the model's shapes on this GPU (minutes); the steps after it run them
        # at most 4 minutes, so that the file comes back within the call: tune saves each shape as it is done, the
        # experts' first, so one cut off still leaves those
        if [[ -z $no_model ]]; then
            attempt limited 240 python3 -m cli.app tune "$model" --no-verify
            written=$(python3 -c "import torch; from quant import gemv; \
print(gemv.user_tuned_file(gemv.device_name(torch.device('cuda'))))") || written=  # under set -e: not fatal
            [[ -f $written ]] && cp "$written" "$results/gemv_tuned_$gpu.json" && tuned=_tuned
        fi
        ;;
    tune-rows)  # tune's, for the experts held by packed row (--meta-rows): their own launches (gemv.tuning_key)
        if [[ -z $no_model ]]; then
            attempt limited 240 python3 -m cli.app tune "$model" --no-verify --meta-rows
            written=$(python3 -c "import torch; from quant import gemv; \
print(gemv.user_tuned_file(gemv.device_name(torch.device('cuda'))))") || written=  # under set -e: not fatal
            [[ -f $written ]] && cp "$written" "$results/gemv_tuned_$gpu.json" && tuned=_tuned
        fi
        ;;
    synth-start)  # synth on 8 CPU threads in the background, while the GPU steps run
        [[ -f $model/manifest.json ]] || { OMP_NUM_THREADS=8 moe synth "$model" --preset mixtral-8x7b >/tmp/synth.log 2>&1 & synth_pid=$!; }
        ;;
    synth)
        if [[ -n ${synth_pid:-} ]]; then  # its log stays in /tmp: show it here, whether it failed or not
            wait "$synth_pid" || tail -20 /tmp/synth.log
            tail -3 /tmp/synth.log
        fi
        [[ -f $model/manifest.json ]] || time moe synth "$model" --preset mixtral-8x7b || true
        [[ -f $model/manifest.json ]] || { no_model=1; echo "== synth failed: the steps that read the model skip" >&2; }
        ;;
    bench)  # the issue's three goals: 12 GiB, 2-bit, replayed routing, oracle prefetch, and the baselines
        attempt bench --gpu-memory 12GiB --route-trace "$trace" --prefetch oracle --compare \
            --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle.json"
        attempt bench --gpu-memory 12GiB --route-trace "$trace" --prefetch oracle --oracle-depth 1 \
            --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_depth1.json"
        attempt bench --gpu-memory 12GiB --route-trace "$trace" --prefetch gate \
            --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_gate.json"
        stamp "$results"/bench_"${gpu}"_mixtral-8x7b${tuned}_*.json
        ;;
    bench-rows)  # bench's first run (without --compare) with the experts' scales and zeros by packed row (--meta-rows,
        # gemv.META_ROWS): against bench's, whether load should hold them so on CUDA by default
        attempt bench --gpu-memory 12GiB --route-trace "$trace" --prefetch oracle --meta-rows \
            --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_rows.json"
        stamp "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_rows.json"
        # side by side in the log, where bench's run is there too (a warning only: the steps after it still run)
        python3 -c "import json, os, sys; [print(f'{p}: {d.get(\"meta_order\", \"grid\")}, decode {d[\"decode_tokens_per_s\"]} tok/s, \
compute {d[\"compute_s_per_token\"] * 1000:.2f} ms/token') for p in sys.argv[1:] if os.path.exists(p) \
for d in [json.load(open(p))]]" "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle.json" \
            "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_rows.json" || true
        ;;
    bench-more)  # the same work without the fused kernel, without CUDA graphs, and with the oracle two layers
        # ahead: a perfect-recall `--prefetch-ahead 2`
        attempt bench --gpu-memory 12GiB --route-trace "$trace" --prefetch oracle --no-fused-gemv \
            --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_dequantize.json"
        attempt bench --gpu-memory 12GiB --route-trace "$trace" --prefetch oracle --no-cuda-graphs \
            --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_eager.json"
        attempt bench --gpu-memory 12GiB --route-trace "$trace" --prefetch oracle --oracle-depth 2 \
            --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_depth2.json"
        stamp "$results"/bench_"${gpu}"_mixtral-8x7b${tuned}_oracle_{dequantize,eager,depth2}.json
        ;;
    embedding)  # the embedding table in RAM against on the GPU, at the same 5 slots a layer: what reading each
        # token's row over PCIe costs a decode step (the 4 slots it frees are the other half of the trade)
        for place in host-embedding no-host-embedding; do  # the probe may refuse the table in RAM: go on to colab
            attempt bench --gpu-memory 12GiB --slots 5 --route-trace "$trace" --prefetch oracle --$place \
                --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_slots5_${place}.json"
        done
        stamp "$results"/bench_"${gpu}"_mixtral-8x7b${tuned}_oracle_slots5_*.json
        ;;
    bench-path)  # the 4x goal's other route: the path policy keeps more than LRU (4.2x the no-cache bytes in simulate)
        attempt bench --gpu-memory 12GiB --route-trace "$trace" --prefetch oracle --policy path --compare \
            --json "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_path.json"
        stamp "$results/bench_${gpu}_mixtral-8x7b${tuned}_oracle_path.json"
        ;;
    profile)  # where a decode step's time goes (after synth): CUDA graphs on and off, and the real path's guess
        attempt profile --route-trace "$trace" --gpu-memory 12GiB --out "$results/profile_decode_${gpu}${tuned}_graphs.json"
        attempt profile --route-trace "$trace" --gpu-memory 12GiB --prefetch gate \
            --out "$results/profile_decode_${gpu}${tuned}_gate.json"
        attempt profile --route-trace "$trace" --gpu-memory 12GiB --no-cuda-graphs \
            --out "$results/profile_decode_${gpu}${tuned}_eager.json"
        stamp "$results"/profile_decode_"${gpu}${tuned}"_*.json
        ;;
    prefill)  # a prompt of the whole default context at 12 and 8 GiB: the prefill's peak against the budget,
        # of which the plan keeps prefill_reserve_bytes free (offload.api.prefill_reserve)
        for gib in 12 8; do
            attempt bench --gpu-memory ${gib}GiB --max-seq-len 4096 --prompt-tokens 4064 --tokens 16 \
                --json "$results/bench_${gpu}_prefill_4096${tuned}_${gib}gib.json"
        done
        stamp "$results"/bench_"${gpu}"_prefill_4096${tuned}_*.json
        attempt python3 -c "import json, sys; [print(p, d['gpu_peak_bytes'], 'reserved', d['gpu_reserved_peak_bytes'], 'of', \
d['gpu_budget_bytes'], 'kept', d['prefill_reserve_bytes']) for p in sys.argv[1:] for d in [json.load(open(p))]]" \
            "$results"/bench_"${gpu}"_prefill_4096${tuned}_*.json
        ;;
    colab)  # a free Colab T4's budgets: exclusive swap, then inclusive at the same slots (RAM uncapped)
        attempt bench --gpu-memory 15GiB --cpu-memory 12GiB --route-trace "$trace" --prefetch oracle \
            --json "$results/bench_${gpu}_colab${tuned}_exclusive.json"
        # the planner splits the same GPU budget alike in both modes (tests/test_planner.py); checked here,
        # with a warning only: the session's later steps must still run
        attempt bench --gpu-memory 15GiB --cache-mode inclusive --route-trace "$trace" \
            --prefetch oracle --json "$results/bench_${gpu}_colab${tuned}_inclusive.json"
        stamp "$results"/bench_"${gpu}"_colab${tuned}_*.json
        python3 -c "import json, sys; a, b = (json.load(open(p))['slots_per_layer'] for p in sys.argv[1:]); \
sys.exit(None if a == b else f'WARNING: inclusive slots {b} differ from exclusive slots {a}')" \
            "$results/bench_${gpu}_colab${tuned}_exclusive.json" "$results/bench_${gpu}_colab${tuned}_inclusive.json" || true
        ;;
    *)
        echo "unknown step $step; steps: synth-start tests attention copy-engine kernel kernel-sweep ncu synth tune tune-rows bench bench-rows bench-more bench-path embedding prefill colab profile" >&2
        exit 2
        ;;
    esac
done
