#!/usr/bin/env bash
# Ethanol NVT with well-tempered metadynamics on sigma_E: i-PI (+ PLUMED/PyCV) and
# `rarefly driver --cv`. Builds model.rfly first if it is missing, renders plumed.dat, runs,
# plots. Run from anywhere; outputs land in this folder.
#   STEPS=N ./run.sh     run N steps instead of input.xml's 400
#   MODEL=path ./run.sh  use another model file instead of ./model.rfly
set -euo pipefail
cd "$(dirname "$0")"
source ../cv_example.sh
run_cv_example rarefly_metad_nvt "ethanol NVT, METAD on sigma_E" \
    "step, sigma_E (eV), C-C-O-H torsion (rad), bias (eV)"
