#!/bin/bash
# GKE / XPK TPU pod workload: {{hosts}} TPU VMs ({{tpu_type}} x {{slices}} slice(s)), one
# llama4-train process per VM. The image must have this repository pip-installed.
#   bash THIS_FILE
set -euo pipefail
xpk workload create \
  --cluster {{cluster}} \
  --workload {{name}} \
  --tpu-type {{tpu_type}} \
  --num-slices {{slices}} \
  --docker-image {{image}} \
  --command "llama4-train {{config}} --distributed{{overrides}}"
