#!/usr/bin/env bash
# 4-bead path-integral MD of ethanol with rarefly running inside i-PI (<ffdirect>).
# Builds model.rfly first if it is missing. Run from anywhere; outputs land in this folder.
set -euo pipefail
cd "$(dirname "$0")"
DATA=../../driver/rarefly/data
if ! command -v rarefly >/dev/null && [ -x ../../.venv/bin/rarefly ]; then
    PATH="$(cd ../../.venv/bin && pwd):$PATH"   # the repository's virtualenv (make setup)
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per process on small machines

if [ ! -f model.rfly ]; then
    rarefly fit --foundation small --data "$DATA/foundation_train.xyz" -o model.rfly \
        --kind lastlayer
fi

i-pi input.xml
echo "trajectories: $PWD/simulation.pos_{0..3}.xyz (one per bead)"
echo "uncertainties: $PWD/simulation.uncertainty_{0..3}, $PWD/simulation.forces_sigma_{0..3}"
