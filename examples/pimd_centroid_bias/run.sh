#!/usr/bin/env bash
# Ethanol path-integral MD (4 beads), metadynamics on the centroid sigma_E: i-PI + PLUMED and
# `rarefly driver --cv`. Builds model.rfly first if it is missing, renders plumed.dat, runs,
# plots. Run from anywhere; outputs land in this folder.
#   STEPS=N ./run.sh     run N steps instead of input.xml's 300
#   MODEL=path ./run.sh  use another model file instead of ./model.rfly
set -euo pipefail
cd "$(dirname "$0")"
source ../cv_example.sh
run_cv_example rarefly_pimd_centroid "ethanol PIMD (4 beads), METAD on the centroid sigma_E" \
    "step, centroid sigma_E (eV), centroid C-C-O-H torsion (rad), bias (eV)"
