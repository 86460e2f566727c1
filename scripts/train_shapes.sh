#!/usr/bin/env bash
# Trains the shipped default model (preset `shapes`) from scratch with the shapes-* recipes (vae, vae-colour,
# tokenizer, ar, decoder, vae-decoder), one stage after
# another, then assembles and stores it in runs/shapes/model (or $OUT): use it with --model runs/shapes/model.
# `scripts/train_shapes.sh --replace-shipped` stores it where the package looks for its default model
# (src/glimage/assets/shapes) instead, replacing the shipped one.
# Rerunning resumes every stage from its last checkpoint (a finished stage with an export is skipped).
# The AR and the decoder both start from the tokenizer's export and need nothing from each other, so they
# train concurrently, one thread each (two busy threads on two cores; set PARALLEL=0 to run them in turn);
# the VAE decoder fine-tune (encoder frozen, so the DiT's latents stay valid) follows the AR on its core.
# The decoder's first leg stops at DECODER_SPLIT (about when the AR and the VAE fine-tune end on this 2-core
# CPU; `stop_at` keeps the learning-rate schedule of the whole run), and its second leg gets both cores.
# Decoupled RL (docs/rl.md) is opt-in: measured on the shipped model it was not better on every category, so
# the shipped model has none. With it, GRPO of the AR (shapes-grpo) and Flow-GRPO of the DiT (shapes-flow-grpo)
# run concurrently, one thread each, from the assembled model, and the result takes the AR of the one and
# the DiT of the other.
#   --rl          RL after the chain (the chain's model stays in runs/shapes/model-sl)
#   --rl-only     only the RL stages, on $BASE (default: the shipped model), ~40 min on this 2-core CPU (36 and 19 min side by side)
# Per-stage wall times go to runs/shapes-times.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
SHIPPED=src/glimage/assets/shapes
OUT=${OUT:-runs/shapes/model}
RL=0 SL=1
for arg in "$@"; do
  case $arg in
    --replace-shipped) OUT=$SHIPPED ;;
    --rl) RL=1 ;;
    --rl-only) SL=0 RL=1 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "train_shapes.sh: unknown argument $arg (known: --replace-shipped, --rl, --rl-only)" >&2; exit 2 ;;
  esac
done
echo "the trained model goes to $OUT$([ "$OUT" = "$SHIPPED" ] && echo ', replacing the shipped model')"
mkdir -p runs
times=runs/shapes-times.txt
: > "$times"
stage() {  # stage NAME [glimage train args...]
  local name=$1; shift
  local t0=$SECONDS
  glimage train "shapes-$name" "$@" >> "runs/shapes-$name.log" 2>&1 || { tail -20 "runs/shapes-$name.log"; return 1; }
  echo "$name $* $((SECONDS - t0)) s" | tee -a "$times"
}
SHIP=(--dtype float16 --defaults height=128 width=128 num_inference_steps=20 guidance_scale=3.0)
if [ "$SL" = 1 ]; then
stage vae
stage vae-colour
stage tokenizer
if [ "${PARALLEL:-1}" = 1 ]; then
  OMP_NUM_THREADS=1 stage decoder --set stop_at="${DECODER_SPLIT:-4800}" & dec=$!
  OMP_NUM_THREADS=1 stage ar && OMP_NUM_THREADS=1 stage vae-decoder
  wait $dec
  stage decoder
else
  stage ar
  stage decoder
  stage vae-decoder
fi
BASE=runs/shapes/model-sl
python -m glimage.train.ship --ar runs/shapes-ar/export --decoder runs/shapes-decoder/export \
  --vae runs/shapes-vae-decoder/export --out "$BASE" "${SHIP[@]}"
fi
BASE=${BASE:-$SHIPPED}
if [ "$RL" = 1 ]; then
  # both read $BASE at their start and copy it into their exports: the final ship may then replace it
  OMP_NUM_THREADS=1 stage flow-grpo --set base="$BASE" & fg=$!
  OMP_NUM_THREADS=1 stage grpo --set base="$BASE"
  wait $fg
  python -m glimage.train.ship --ar runs/shapes-grpo/export --decoder runs/shapes-flow-grpo/export \
    --out "$OUT" "${SHIP[@]}"
elif [ "$BASE" != "$OUT" ]; then
  rm -rf "$OUT" && cp -r "$BASE" "$OUT"
fi
echo "total $SECONDS s" | tee -a "$times"
[ "$OUT" = "$SHIPPED" ] || echo "use it: glimage generate 'a red circle' --model $OUT (--replace-shipped: the default)"
