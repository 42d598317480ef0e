#!/bin/bash
# Runs on the GPU machine from the checkout root (shipped in .carry by bench/gpu.sh): the GPU
# test binary, moz-lab's paper-block benchmark (dense and MoZ, bf16, MFU against the measured
# matmul ceiling), the sequence-length sweep, and PyTorch's reference on the same model (eager
# and torch.compile with the SSD's cumsums written as CUMSUM="matmul eager", see torch_ref.py).
# Each phase logs to $OUT/<phase>.log; a summary ends the output.
set -u
C=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
phases=${*:-tests bench sweep torch compile}
R="bash $C/run-on-gpu.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
for ph in $phases; do
  start=$(date +%s)
  case $ph in
    tests) $R "$C/gpu-tests" --test-threads=1 --nocapture ;;
    bench) $R "$C/moz-lab" bench --config paper-block --variants dense,moz --device cuda:0 \
             --dtype bf16 --ceiling --steps "$STEPS" --warmup "$WARMUP" ;;
    composed) MOZ_LAB_COMPOSED_SSD=1 $R "$C/moz-lab" bench --config paper-block --variants dense \
             --device cuda:0 --dtype bf16 --steps "$STEPS" --warmup "$WARMUP" ;;
    ablate) # each own kernel of the mixer swapped back for composed candle ops, one at a time
           for var in MOZ_LAB_COMPOSED_CONV MOZ_LAB_COMPOSED_NORM MOZ_LAB_COMPOSED_SSD; do
             echo "-- $var=1"
             env $var=1 $R "$C/moz-lab" bench --config paper-block --variants dense --device cuda:0 \
               --dtype bf16 --steps 5 --warmup 2 | grep -E "tokens/s|rc="; done ;;
    chunks) # the SSD kernel's chunk length (the blocks' serial walk; the result is exact for any)
           for q in ${CHUNKS:-16 32 64 128}; do
             echo "-- MOZ_LAB_SSD_KERNEL_CHUNK=$q"
             MOZ_LAB_SSD_KERNEL_CHUNK=$q $R "$C/moz-lab" bench --config paper-block --variants dense \
               --device cuda:0 --dtype bf16 --steps 5 --warmup 2 | grep -E "tokens/s|rc="; done ;;
    granules) # the device routing's granule of expert row counts (MoZ; fewer distinct GEMM shapes)
           for g in ${GRANULES:-256 512 1024 2048}; do
             echo "-- MOZ_LAB_ROUTE_GRANULE=$g"
             MOZ_LAB_ROUTE_GRANULE=$g $R "$C/moz-lab" bench --config paper-block --variants moz \
               --device cuda:0 --dtype bf16 --steps "$STEPS" --warmup "$WARMUP" | grep -E "tokens/s|rc="; done ;;
    nowarm) # MoZ without planning the expert GEMM shapes up front
           MOZ_LAB_NO_GEMM_WARMUP=1 $R "$C/moz-lab" bench --config paper-block --variants moz \
             --device cuda:0 --dtype bf16 --steps "$STEPS" --warmup "$WARMUP" | grep -E "tokens/s|rc=" ;;
    sweeps) # the SSD on the register sweeps (kernels/ssd_scan.cu) instead of tensor cores
           MOZ_LAB_SSD_SWEEP=1 $R "$C/moz-lab" bench --config paper-block --variants dense,moz \
             --device cuda:0 --dtype bf16 --steps "$STEPS" --warmup "$WARMUP" ;;
    eager) # CUDA's lazy module loading off: cuBLAS loads every kernel at start, not at first use
           CUDA_MODULE_LOADING=EAGER $R "$C/moz-lab" bench --config paper-block --variants dense,moz \
             --device cuda:0 --dtype bf16 --steps "$STEPS" --warmup "$WARMUP" ;;
    oom) # the GPU test that fills the GPU with ballast, then a run fails with "GPU out of memory"
         # and a small run afterwards trains (also part of `tests`)
         MOZ_LAB_TRACE=1 $R "$C/gpu-tests" --test-threads=1 --nocapture out_of_memory ;;
    switches) # MoZ with one of this session's GPU paths switched back at a time
           for var in MOZ_LAB_HOST_ROUTING MOZ_LAB_CUDA_POOL_RELEASE MOZ_LAB_COMPOSED_SOFTMAX MOZ_LAB_COMPOSED_AUX; do
             echo "-- $var=1"
             env $var=1 $R "$C/moz-lab" bench --config paper-block --variants moz --device cuda:0 \
               --dtype bf16 --steps "$STEPS" --warmup "$WARMUP" | grep -E "tokens/s|rc="; done ;;
    probe) # host time of a cuBLAS GEMM with a repeated and with a new row count
           MOZ_LAB_BENCH_GEMM_PROBE=1 $R "$C/moz-lab" bench --config paper-block --variants dense \
             --device cuda:0 --dtype bf16 --steps 2 --warmup 1 ;;
    split) MOZ_LAB_BENCH_SPLIT=1 $R "$C/moz-lab" bench --config paper-block --variants dense,moz \
             --device cuda:0 --dtype bf16 --steps 3 --warmup 2 ;;
    events) MOZ_LAB_CUDA_EVENTS=1 $R "$C/moz-lab" bench --config paper-block --variants dense \
             --device cuda:0 --dtype bf16 --steps "$STEPS" --warmup "$WARMUP" ;;
    f32) $R "$C/moz-lab" bench --config paper-block --variants dense,moz --device cuda:0 \
             --dtype f32 --steps "$STEPS" --warmup "$WARMUP" ;;
    nsys) if command -v nsys >/dev/null; then
             LD_LIBRARY_PATH=$(python3 -c 'import nvidia,os;print(os.path.dirname(list(nvidia.__path__)[0]))')/nvidia/cu13/lib \
             timeout 200 nsys profile -t cuda -o "$OUT/prof" --stats=true --force-overwrite true "$C/moz-lab" bench \
               --config paper-block --variants dense --device cuda:0 --dtype bf16 --steps 2 --warmup 1 \
               | grep -A40 "cuda_gpu_kern_sum" | head -60; rm -f "$OUT"/prof.*
           else echo "no nsys on this machine"; ls /usr/local/cuda*/bin 2>/dev/null | head; fi ;;
    sweep) $R "$C/moz-lab" bench --config paper-block --variants dense --device cuda:0 --dtype bf16 \
             --steps "$STEPS" --warmup "$WARMUP" --seq-sweep 512,1024,2048,4096,8192 ;;
    torch) for v in dense moz; do
             python3 "$C/torch_ref.py" bench --config paper-block --variant $v --device cuda \
               --amp bf16 --steps "$STEPS" --warmup "$WARMUP"; done ;;
    compile) for cs in ${CUMSUM:-matmul eager}; do for v in ${COMPILE_VARIANTS:-dense moz}; do
             timeout ${COMPILE_TIMEOUT:-240} python3 "$C/torch_ref.py" bench --config paper-block --variant $v \
               --device cuda --amp bf16 --compile --cumsum $cs --steps "$STEPS" --warmup "$WARMUP"
             echo "(rc $? for compile --cumsum $cs $v)"; done; done ;;
    torchcheck) python3 "$C/torch_ref.py" selftest ;;
    *) echo "unknown phase $ph" ;;
  esac > "$OUT/$ph.log" 2>&1
  echo "== $ph: rc $? in $(( $(date +%s) - start )) s"
done
echo "== summary"
for f in "$OUT"/*.log; do
  echo "-- $(basename "$f")"
  grep -hE "^test |test result|SKIP|probe|issued|tokens/s|ceiling|^-- MOZ|rel err|oversized|small run|GPU out of memory|gpu_mem|quickstart/|max \|gpu|panicked|Error|error|forward|SSD op|^\(rc|FAIL|PASS" "$f" | head -80
done
