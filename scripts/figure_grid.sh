#!/usr/bin/env bash
# The run grid the three figure scripts share; sourced by them after they define `recipe` (the script under
# recipes/), `n` (real examples per generation), `fixed` (flags every run takes, an array) and `out`, with
# the figure script's extra flags as the positional parameters. Over seeds 0, 1, 2 it runs
#   (a) epochs per generation (the published protocol): replace, accumulate, accumulate_subsample;
#   (b) fixed compute (--steps_per_generation first: every generation takes generation 0's optimizer steps):
#       accumulate, the one workflow whose training set grows (replace's and accumulate_subsample's sets keep
#       generation 0's size, so both protocols train them alike);
#   (c) the real-only reference at the same steps: mix(real=N, synthetic=0), N real examples every generation;
# then writes one report over the 15 runs. The extra flags come last, so they override the script's own.
# FIGURE_DRY=1: install nothing and run nothing; every recipe command line is parsed by the recipe's own
# parser instead (benchmarks/check_flags.py, with PYTHON or .venv/bin/python), so the scripts' flags stay real.
dry=${FIGURE_DRY:-0}
py=${PYTHON:-.venv/bin/python}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=true MPLBACKEND=Agg
if [ "$dry" = 1 ]; then
  listing=$(mktemp)
  trap 'rm -f "$listing"' EXIT
else
  bash scripts/setup.sh
fi
run() {  # run NAME FLAGS...: one run of the grid into $out/NAME
  local name=$1
  shift
  local cmd=("$py" "recipes/$recipe" --real_size "$n" "${fixed[@]}" "$@" --out_dir "$out/$name" "${extra[@]}")
  if [ "$dry" = 1 ]; then
    printf '%s\t%s\n' "$name" "$(printf '%q ' "${cmd[@]}")" >>"$listing"
  else
    "${cmd[@]}"
  fi
}
extra=("$@")
for seed in 0 1 2; do
  for wf in replace accumulate accumulate_subsample; do
    run "${wf}_s$seed" --workflow "$wf" --seed "$seed"
  done
  run "accumulate_fixed_s$seed" --workflow accumulate --steps_per_generation first --seed "$seed"
  run "real_only_s$seed" --workflow "mix(real=$n, synthetic=0)" --steps_per_generation first --seed "$seed"
done
if [ "$dry" = 1 ]; then
  "$py" benchmarks/check_flags.py "$listing"
  exit
fi
$py -m tooling.report "$out"/*_s* --out "$out/report"
echo "figure done: $out/report/report.md"
