# Shared steps of the uncertainty-CV examples (sourced by metad_nvt/run.sh and
# pimd_centroid_bias/run.sh, run from the example's own folder):
#   run_cv_example SOCKET_NAME "plot title" "COLVAR column description"
# Builds or borrows model.rfly, renders plumed.dat, runs i-PI with `rarefly driver --cv`, plots.
#   STEPS=N   run N steps instead of input.xml's
#   MODEL=path use another model file instead of ./model.rfly
run_cv_example() {
    local NAME=$1 TITLE=$2 COLUMNS=$3
    local DATA=../../driver/rarefly/data
    if ! command -v rarefly >/dev/null && [ -x ../../.venv/bin/rarefly ]; then
        PATH="$(cd ../../.venv/bin && pwd):$PATH"   # the repository's virtualenv (make setup)
    fi
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # one thread per process on small machines
    MODEL="${MODEL:-model.rfly}"

    if [ ! -f "$MODEL" ]; then                   # borrow a sibling example's model
        for other in ../*/model.rfly; do
            [ -f "$other" ] && cp "$other" "$MODEL" && echo "model: copied $other" && break
        done
    fi
    if [ ! -f "$MODEL" ]; then                   # a few minutes on 2 cores, once
        rarefly fit --foundation small --data "$DATA/foundation_train.xyz" -o "$MODEL" \
            --kind lastlayer
    fi

    python -m rarefly.cv render plumed.dat.in -o plumed.dat
    local INPUT=input.xml
    if [ -n "${STEPS:-}" ]; then
        INPUT=input.steps.xml
        sed "s|<total_steps>[0-9]*</total_steps>|<total_steps>$STEPS</total_steps>|" input.xml > "$INPUT"
    fi

    rm -f COLVAR HILLS bck.* simulation.* "/tmp/ipi_$NAME"   # old outputs, a stale socket
    export RAREFLY_CV_ENDPOINT="ipc:///tmp/rarefly-cv-$NAME"   # the driver's default for -a $NAME
    i-pi "$INPUT" > ipi.log 2>&1 &
    IPI=$!
    trap 'kill -INT "$IPI" 2>/dev/null || true' INT TERM   # i-PI exits cleanly on SIGINT
    rarefly driver --model "$MODEL" --template "$DATA/ethanol.xyz" -u -a "$NAME" --cv -q
    wait "$IPI" || { echo "i-PI failed, see $PWD/ipi.log"; tail -20 ipi.log; exit 1; }

    python ../plot_colvar.py COLVAR -o colvar.png --title "$TITLE"
    echo "COLVAR: $PWD/COLVAR ($COLUMNS)"
    echo "HILLS:  $PWD/HILLS"
    echo "plot:   $PWD/colvar.png"
}
