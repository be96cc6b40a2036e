#!/usr/bin/env bash
# The coordinator's TLS credentials: a private certificate authority (CA) and the SuperLink's
# server certificate signed by it, valid for the names and addresses partners connect to.
#
#   deploy/tls-certificates.sh DIR [SAN]
#
# DIR gets ca.crt (give this to every partner: their SuperNodes verify the SuperLink with it),
# ca.key (keep it secret; only needed to sign a new server certificate), server.pem and
# server.key (the SuperLink's). SAN is the certificate's subjectAltName, by default
# "DNS:localhost,IP:127.0.0.1"; for a real coordinator, e.g. "DNS:fl.example.org,IP:203.0.113.7".
set -euo pipefail
dir=${1:?usage: $0 DIR [SAN]}
san=${2:-DNS:localhost,IP:127.0.0.1}
mkdir -p "$dir"
cd "$dir"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days 365 -nodes \
    -keyout ca.key -out ca.crt -subj "/CN=snowfed federation CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes \
    -keyout server.key -out server.csr -subj "/CN=snowfed SuperLink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 365 \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 600 ca.key server.key
echo "wrote $dir/ca.crt, ca.key, server.pem, server.key (subjectAltName $san)"
