#!/usr/bin/env bash
# NVT MD of ethanol: the i-PI server and `rarefly driver`, connected by a UNIX socket.
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

rm -f /tmp/ipi_rarefly_md_nvt                    # a socket left behind by a killed run
i-pi input.xml > ipi.log 2>&1 &
IPI=$!
trap 'kill -INT "$IPI" 2>/dev/null || true' INT TERM   # i-PI exits cleanly on SIGINT
rarefly driver --model model.rfly --template "$DATA/ethanol.xyz" -u -a rarefly_md_nvt
wait "$IPI"
echo "trajectory: $PWD/simulation.pos_0.xyz"
echo "uncertainties: $PWD/simulation.uncertainty_0 (eV, confidence)," \
     "$PWD/simulation.forces_sigma_0 (eV/A per atom)"
