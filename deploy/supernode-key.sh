#!/usr/bin/env bash
# A partner site's SuperNode authentication key pair (ECDSA on NIST P-384, OpenSSH format, as
# Flower 1.41 expects):
#
#   deploy/supernode-key.sh DIR NAME
#
# writes DIR/NAME (the private key: stays at the site, passed to flower-supernode with
# --auth-supernode-private-key) and DIR/NAME.pub (the public key: sent to the coordinator, who
# registers it with `flwr supernode register`).
set -euo pipefail
dir=${1:?usage: $0 DIR NAME}
name=${2:?usage: $0 DIR NAME}
mkdir -p "$dir"
ssh-keygen -q -t ecdsa -b 384 -N "" -C "snowfed-$name" -f "$dir/$name"
echo "wrote $dir/$name (private) and $dir/$name.pub (public)"
