#!/bin/sh
# How the committed test certificates in this directory were made.
#
# They are long-lived (valid 2000-01-01 .. 2125-01-01, backdated so that a
# machine whose clock is behind still accepts them) so the suite needs nothing
# but the stdlib and pytest.  Nothing here is secret and none of it may ever
# be used outside the tests.  Re-run to regenerate them (OpenSSL 1.1.1+);
# it uses `openssl ca` because `req -x509` cannot set notBefore before 3.4.
#
#   ca.pem / ca.key        the test CA (self-signed, CA:TRUE)
#   server.pem / .key      leaf signed by the test CA: CN=localhost,
#                          SAN DNS:localhost, IP:127.0.0.1, IP:::1.
#                          server.pem holds the leaf ONLY (no chain): clients
#                          trust ca.pem directly, so no intermediate is needed.
#   other.pem / .key       self-signed, same names as server.pem but NOT issued
#                          by the test CA: for "certificate fails" tests.
#
# Git does not keep file modes other than the executable bit, so server.key is
# checked out 0644; tests that need a private key file with safe permissions
# (tls.check_key_file) must copy it and chmod the copy to 0600.
set -eu
cd "$(dirname "$0")"

START=20000101000000Z
END=21250101000000Z
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$WORK/index.txt"
echo 1000 > "$WORK/serial"

cat > "$WORK/ca.cnf" <<CNF
[ca]
default_ca = testca
[testca]
dir = $WORK
database = $WORK/index.txt
serial = $WORK/serial
new_certs_dir = $WORK
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[anything]
organizationName = optional
commonName = supplied
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = DNS:localhost,IP:127.0.0.1,IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
CNF

# name key subject extensions signer-cert signer-key
sign() {
    openssl req -new -newkey rsa:2048 -nodes -sha256 -config "$WORK/ca.cnf" \
        -keyout "$1.key" -out "$WORK/$1.csr" -subj "$2"
    if [ "$4" = self ]; then
        openssl ca -batch -notext -config "$WORK/ca.cnf" -selfsign \
            -keyfile "$1.key" -startdate $START -enddate $END \
            -extensions "$3" -in "$WORK/$1.csr" -out "$1.pem"
    else
        openssl ca -batch -notext -config "$WORK/ca.cnf" \
            -cert ca.pem -keyfile ca.key -startdate $START -enddate $END \
            -extensions "$3" -in "$WORK/$1.csr" -out "$1.pem"
    fi
}

sign ca "/O=backupmx tests/CN=backupmx test CA" v3_ca self
sign server "/O=backupmx tests/CN=localhost" v3_server ca
# Same names and extensions as server.pem, but self-signed: untrusted.
sign other "/O=not the backupmx test CA/CN=localhost" v3_server self

chmod 0600 ca.key server.key other.key
