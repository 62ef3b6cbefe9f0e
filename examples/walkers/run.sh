#!/usr/bin/env bash
# Two walkers (WALKERS=N for more) of ethanol NVT sharing one well-tempered METAD bias on
# sigma_E: per walker an i-PI (+ PLUMED/PyCV) and a `rarefly driver --cv`, in walkerI/;
# hills in HILLS.0, HILLS.1, ... here. Builds model.rfly first if it is missing.
#   STEPS=N ./run.sh     run N steps per walker instead of the template's 300
#   MODEL=path ./run.sh  use another model file instead of ./model.rfly
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../driver/rarefly/data
if ! command -v rarefly >/dev/null && [ -x ../../.venv/bin/rarefly ]; then
    PATH="$(cd ../../.venv/bin && pwd):$PATH"   # the repository's virtualenv (make setup)
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per process on small machines
MODEL="$(realpath -m "${MODEL:-model.rfly}")"
N="${WALKERS:-2}"

if [ ! -f "$MODEL" ]; then
    for other in ../metad_nvt/model.rfly ../pimd_centroid_bias/model.rfly; do
        [ -f "$other" ] && cp "$other" "$MODEL" && echo "model: copied $other" && break
    done
fi
if [ ! -f "$MODEL" ]; then                       # a few minutes on 2 cores, once
    rarefly fit --foundation small --data "$DATA/foundation_train.xyz" -o "$MODEL" \
        --kind lastlayer
fi

rm -f HILLS.* bck.* colvar.png
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done' INT TERM
for ((i = 0; i < N; i++)); do
    W=walker$i
    rm -rf "$W" /tmp/ipi_rarefly_walker$i && mkdir "$W"
    python -m rarefly.cv render plumed.dat.in --set WALKERS_N="$N" --set WALKER_ID="$i" \
        -o "$W/plumed.dat"
    sed "s/__ID__/$i/g" input.xml.in > "$W/input.xml"
    if [ -n "${STEPS:-}" ]; then
        sed -i "s|<total_steps>[0-9]*<|<total_steps>$STEPS<|" "$W/input.xml"
    fi
    (cd "$W" && RAREFLY_CV_ENDPOINT="ipc:///tmp/rarefly-cv-rarefly_walker$i" \
        exec i-pi input.xml > ipi.log 2>&1) &
    PIDS+=($!)
    (cd "$W" && exec rarefly driver --model "$MODEL" --template "../$DATA/ethanol.xyz" \
        -u -a "rarefly_walker$i" --cv -q > driver.log 2>&1) &
done
status=0
for p in "${PIDS[@]}"; do wait "$p" || status=1; done
wait   # the drivers end when their i-PI sends EXIT
[ "$status" = 0 ] || { echo "a walker failed, see walker*/ipi.log"; exit 1; }

COLVARS=() LABELS=()
for ((i = 0; i < N; i++)); do COLVARS+=(walker$i/COLVAR); LABELS+=(walker$i); done
python ../plot_colvar.py "${COLVARS[@]}" -o colvar.png --labels "$(IFS=,; echo "${LABELS[*]}")" \
    --title "$N walkers, one METAD bias on sigma_E"
echo "COLVAR: $PWD/walker{0..$((N - 1))}/COLVAR (step, sigma_E (eV), C-C-O-H torsion (rad), bias (eV))"
echo "HILLS:  $PWD/HILLS.{0..$((N - 1))} (shared by all walkers)"
echo "plot:   $PWD/colvar.png"
