#!/usr/bin/env bash
# Ethanol NVT with well-tempered metadynamics on sigma_E: i-PI (+ PLUMED/PyCV) and
# `rarefly driver --cv`. Builds model.rfly first if it is missing, renders plumed.dat, runs,
# plots. Run from anywhere; outputs land in this folder.
#   STEPS=N ./run.sh     run N steps instead of input.xml's 400
#   MODEL=path ./run.sh  use another model file instead of ./model.rfly
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../driver/rarefly/data
NAME=rarefly_metad_nvt                             # socket /tmp/ipi_$NAME
if ! command -v rarefly >/dev/null && [ -x ../../.venv/bin/rarefly ]; then
    PATH="$(cd ../../.venv/bin && pwd):$PATH"   # the repository's virtualenv (make setup)
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per process on small machines
MODEL="${MODEL:-model.rfly}"

if [ ! -f "$MODEL" ]; then
    for other in ../pimd_centroid_bias/model.rfly ../walkers/model.rfly; do
        [ -f "$other" ] && cp "$other" "$MODEL" && echo "model: copied $other" && break
    done
fi
if [ ! -f "$MODEL" ]; then                       # a few minutes on 2 cores, once
    rarefly fit --foundation small --data "$DATA/foundation_train.xyz" -o "$MODEL" \
        --kind lastlayer
fi

python -m rarefly.cv render plumed.dat.in -o plumed.dat
INPUT=input.xml
if [ -n "${STEPS:-}" ]; then
    INPUT=input.steps.xml
    sed "s|<total_steps>[0-9]*</total_steps>|<total_steps>$STEPS</total_steps>|" input.xml > "$INPUT"
fi

rm -f COLVAR HILLS bck.* simulation.* /tmp/ipi_$NAME   # old outputs, a stale socket
export RAREFLY_CV_ENDPOINT="ipc:///tmp/rarefly-cv-$NAME"   # the driver's default for -a $NAME
i-pi "$INPUT" > ipi.log 2>&1 &
IPI=$!
trap 'kill -INT "$IPI" 2>/dev/null || true' INT TERM   # i-PI exits cleanly on SIGINT
rarefly driver --model "$MODEL" --template "$DATA/ethanol.xyz" -u -a "$NAME" --cv -q
wait "$IPI" || { echo "i-PI failed, see $PWD/ipi.log"; tail -20 ipi.log; exit 1; }

python ../plot_colvar.py COLVAR -o colvar.png --title "ethanol NVT, METAD on sigma_E"
echo "COLVAR: $PWD/COLVAR (step, sigma_E (eV), C-C-O-H torsion (rad), bias (eV))"
echo "HILLS:  $PWD/HILLS"
echo "plot:   $PWD/colvar.png"
