#!/bin/sh
# Development PKI for compose.yaml (until `iotagent-mqtt pki` exists): a CA, the broker's server certificate, the
# service's client certificate and a CRL, made with the openssl command line. POSIX sh (the pki service runs it on
# Alpine's busybox sh).
#
#   pki-bootstrap.sh [init]   create what is missing; keep what exists and is still valid; refresh the CRL
#   pki-bootstrap.sh ca       print the CA certificate
#   pki-bootstrap.sh sign     read a CSR (PEM) on stdin, print a client certificate signed by the CA
#   pki-bootstrap.sh revoke   read a certificate (PEM) on stdin, revoke it and rewrite the CRL
#   pki-bootstrap.sh crl      rewrite the CRL
#
# Output goes to PKI_DIR (what the broker and the service mount read-only):
#   ca.crt, crl.pem                 0644
#   server.crt / server.key         broker (SAN: SERVER_NAMES), key 0600 owned by BROKER_UID (VerneMQ: 10000)
#   service.crt / service.key       CN = SERVICE_CN (the service's MQTT_USERNAME), key 0600 owned by SERVICE_UID
# The CA key and the `openssl ca` database stay in CA_DIR, which only this script mounts.
# Only stdout of `ca` and `sign` carries data; everything else is logged to stderr.
set -eu

PKI_DIR=${PKI_DIR:-/pki}
CA_DIR=${CA_DIR:-/ca}
CA_CN=${CA_CN:-iotagent-mqtt development CA}
SERVER_CN=${SERVER_CN:-vernemq}
SERVER_NAMES=${SERVER_NAMES:-vernemq localhost 127.0.0.1}
SERVICE_CN=${SERVICE_CN:-k2v-bridge}
BROKER_UID=${BROKER_UID:-10000}
SERVICE_UID=${SERVICE_UID:-10001}
KEY_BITS=${KEY_BITS:-2048}
CA_DAYS=${CA_DAYS:-3650}
CERT_DAYS=${CERT_DAYS:-825}
CRL_DAYS=${CRL_DAYS:-30}
# Certificates expiring within this many seconds are issued again by `init`.
RENEW_BEFORE=${RENEW_BEFORE:-2592000}

log() { echo "pki: $*" >&2; }
die() { log "error: $*"; exit 1; }

if ! command -v openssl >/dev/null 2>&1; then
  if command -v apk >/dev/null 2>&1; then
    log "installing openssl (apk)"
    apk add --no-cache --quiet openssl >&2 || die "cannot install openssl"
  else
    die "openssl not found"
  fi
fi

CNF="$CA_DIR/openssl.cnf"
IS_ROOT=false
[ "$(id -u)" = 0 ] && IS_ROOT=true

# subjectAltName from SERVER_NAMES: dotted quads become IP entries, the rest DNS entries.
san() {
  out=""
  for san_name in $SERVER_NAMES; do
    case "$san_name" in
      *[!0-9.]*) entry="DNS:$san_name" ;;
      *) entry="IP:$san_name" ;;
    esac
    out="${out:+$out,}$entry"
  done
  echo "$out"
}

write_config() {
  mkdir -p "$CA_DIR/newcerts"
  chmod 0700 "$CA_DIR"
  [ -f "$CA_DIR/index.txt" ] || : >"$CA_DIR/index.txt"
  [ -f "$CA_DIR/serial" ] || openssl rand -hex 16 >"$CA_DIR/serial"
  [ -f "$CA_DIR/crlnumber" ] || echo 01 >"$CA_DIR/crlnumber"
  # Rewritten every time, so SERVER_NAMES and the paths follow the environment.
  cat >"$CNF.tmp" <<EOF
[ ca ]
default_ca = dev_ca

[ dev_ca ]
database = $CA_DIR/index.txt
new_certs_dir = $CA_DIR/newcerts
serial = $CA_DIR/serial
crlnumber = $CA_DIR/crlnumber
certificate = $CA_DIR/ca.crt
private_key = $CA_DIR/ca.key
default_md = sha256
default_days = $CERT_DAYS
default_crl_days = $CRL_DAYS
policy = policy_cn
# Keep only the CN of a request: identities are CNs (tenant:device, the service name, the broker).
unique_subject = no
copy_extensions = none
email_in_dn = no
crl_extensions = crl_ext

[ policy_cn ]
commonName = supplied

[ req ]
distinguished_name = req_dn
string_mask = utf8only

[ req_dn ]

[ v3_ca ]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[ server_cert ]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $(san)

[ client_cert ]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[ crl_ext ]
authorityKeyIdentifier = keyid
EOF
  mv "$CNF.tmp" "$CNF"
}

# install MODE OWNER SOURCE DEST: move SOURCE to DEST atomically (readers never see a partial file).
install_file() {
  mode=$1 owner=$2 src=$3 dest=$4
  chmod "$mode" "$src"
  if [ -n "$owner" ] && $IS_ROOT; then
    chown "$owner:$owner" "$src"
  fi
  mv -f "$src" "$dest"
}

ensure_ca() {
  if [ -f "$CA_DIR/ca.key" ] && [ -f "$CA_DIR/ca.crt" ]; then
    log "CA exists: $(openssl x509 -in "$CA_DIR/ca.crt" -noout -subject)"
  else
    log "creating the development CA ($CA_CN, $CA_DAYS days)"
    openssl req -x509 -new -newkey "rsa:$KEY_BITS" -nodes -sha256 -days "$CA_DAYS" \
      -keyout "$CA_DIR/ca.key.tmp" -out "$CA_DIR/ca.crt.tmp" -subj "/CN=$CA_CN" \
      -config "$CNF" -extensions v3_ca 2>/dev/null
    chmod 0600 "$CA_DIR/ca.key.tmp"
    mv -f "$CA_DIR/ca.key.tmp" "$CA_DIR/ca.key"
    mv -f "$CA_DIR/ca.crt.tmp" "$CA_DIR/ca.crt"
  fi
  if ! cmp -s "$CA_DIR/ca.crt" "$PKI_DIR/ca.crt" 2>/dev/null; then
    cp "$CA_DIR/ca.crt" "$PKI_DIR/ca.crt.tmp"
    install_file 0644 "" "$PKI_DIR/ca.crt.tmp" "$PKI_DIR/ca.crt"
  fi
}

# still_valid NAME: NAME.crt and NAME.key exist, the certificate chains to the current CA and does not expire soon.
still_valid() {
  [ -f "$PKI_DIR/$1.crt" ] && [ -f "$PKI_DIR/$1.key" ] &&
    openssl verify -CAfile "$CA_DIR/ca.crt" "$PKI_DIR/$1.crt" >/dev/null 2>&1 &&
    openssl x509 -in "$PKI_DIR/$1.crt" -noout -checkend "$RENEW_BEFORE" >/dev/null 2>&1
}

# issue NAME CN EXTENSIONS OWNER: a new key and certificate, recorded in the CA database.
issue() {
  name=$1 cn=$2 ext=$3 owner=$4
  log "issuing $name.crt (CN=$cn, $ext)"
  openssl req -new -newkey "rsa:$KEY_BITS" -nodes -keyout "$PKI_DIR/$name.key.tmp" \
    -out "$CA_DIR/$name.csr" -subj "/CN=$cn" -config "$CNF" 2>/dev/null
  openssl ca -batch -config "$CNF" -extensions "$ext" -notext \
    -in "$CA_DIR/$name.csr" -out "$PKI_DIR/$name.crt.tmp" 2>/dev/null ||
    die "openssl ca refused to sign $name"
  rm -f "$CA_DIR/$name.csr"
  install_file 0600 "$owner" "$PKI_DIR/$name.key.tmp" "$PKI_DIR/$name.key"
  install_file 0644 "" "$PKI_DIR/$name.crt.tmp" "$PKI_DIR/$name.crt"
}

ensure_leaf() {
  if still_valid "$1"; then
    log "$1.crt exists and is valid: $(openssl x509 -in "$PKI_DIR/$1.crt" -noout -subject)"
  else
    issue "$@"
  fi
}

write_crl() {
  openssl ca -batch -config "$CNF" -gencrl -crldays "$CRL_DAYS" -out "$PKI_DIR/crl.pem.tmp" 2>/dev/null ||
    die "cannot write the CRL"
  install_file 0644 "" "$PKI_DIR/crl.pem.tmp" "$PKI_DIR/crl.pem"
  log "crl.pem written ($(grep -c '^R' "$CA_DIR/index.txt" || true) revoked)"
}

require_ca() {
  [ -f "$CA_DIR/ca.key" ] && [ -f "$CA_DIR/ca.crt" ] || die "no CA in $CA_DIR: run init first"
  write_config
}

command=${1:-init}
case "$command" in
  init)
    mkdir -p "$PKI_DIR" "$CA_DIR"
    chmod 0755 "$PKI_DIR"
    write_config
    ensure_ca
    ensure_leaf server "$SERVER_CN" server_cert "$BROKER_UID"
    ensure_leaf service "$SERVICE_CN" client_cert "$SERVICE_UID"
    # Refreshed on every run so that nextUpdate stays ahead (OpenSSL-based brokers refuse an expired CRL).
    write_crl
    $IS_ROOT || log "not root: file owners left unchanged (the broker needs server.key readable by uid $BROKER_UID)"
    log "done: $(cd "$PKI_DIR" && ls | tr '\n' ' ')"
    ;;
  ca)
    require_ca
    cat "$CA_DIR/ca.crt"
    ;;
  sign)
    require_ca
    csr="$CA_DIR/sign.$$.csr"
    crt="$CA_DIR/sign.$$.crt"
    trap 'rm -f "$csr" "$crt"' EXIT
    cat >"$csr"
    subject=$(openssl req -in "$csr" -noout -subject 2>/dev/null) || die "stdin is not a PEM certificate request"
    openssl req -in "$csr" -noout -verify 2>/dev/null || die "the request's signature does not verify"
    log "signing $subject ($CERT_DAYS days, clientAuth)"
    openssl ca -batch -config "$CNF" -extensions client_cert -notext -in "$csr" -out "$crt" 2>/dev/null ||
      die "openssl ca refused the request (it needs a CN)"
    cat "$crt"
    ;;
  revoke)
    require_ca
    crt="$CA_DIR/revoke.$$.crt"
    trap 'rm -f "$crt"' EXIT
    cat >"$crt"
    serial=$(openssl x509 -in "$crt" -noout -serial 2>/dev/null) || die "stdin is not a PEM certificate"
    openssl ca -batch -config "$CNF" -revoke "$crt" 2>/dev/null || die "cannot revoke $serial"
    log "revoked $serial"
    write_crl
    ;;
  crl)
    require_ca
    write_crl
    ;;
  *)
    die "unknown command $command (init, ca, sign, revoke, crl)"
    ;;
esac
