#!/bin/bash
# Make a test CA and TLS 1.3 mutual-authentication certificates, laid out the
# way QEMU's tls-creds-x509 directory is. Needs only the openssl command
# (OpenSSL 3.0). EC P-256 keys, SHA-256; keys are mode 0600.
#
# Usage: scripts/gen-certs.sh [OPTIONS] DIR
#
# Writes DIR/ca-cert.pem + ca-key.pem (the CA), DIR/server-cert.pem +
# server-key.pem (the destination: SAN DNS:localhost, IP:127.0.0.1, IP:::1
# and every --server-name; EKU serverAuth; CN the first --server-name, else
# localhost) and DIR/client-cert.pem + client-key.pem (the source: EKU
# clientAuth), and nothing else.
#
#   --server-name NAME  extra SAN of the server certificate (repeatable; an
#                       IPv4/IPv6 address becomes an IP: entry, else DNS:)
#   --client-cn CN      common name of the client certificate (ferry-source)
#   --days N            validity of every certificate, in days (365)
#   --ca-from OTHERDIR  sign with the CA of OTHERDIR (its ca-cert.pem is copied
#                       into DIR, its key is not) instead of making a new CA
#   --expired           server and client certificates valid only from
#                       2020-01-01 to 2020-01-02 (the CA stays valid)
#   --force             overwrite an existing DIR/ca-cert.pem or ca-key.pem
#   -h, --help          print this text
#
# Each run without --ca-from makes a new CA with its own name, so "a
# certificate from another CA" is one made by a run on another DIR.
#
# Examples:
#   scripts/gen-certs.sh /tmp/pki
#   scripts/gen-certs.sh --ca-from /tmp/pki --client-cn intruder /tmp/pki2
#   scripts/gen-certs.sh --expired /tmp/pki-expired
set -euo pipefail

prog=${0##*/}

usage() {
	# The comment header above, from "Usage:" to the examples.
	sed -n '/^# Usage:/,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
	echo "$prog: $*" >&2
	exit 1
}

need_arg() {
	[ $# -ge 2 ] || die "$1 needs an argument (see --help)"
}

dir=""
server_names=()
client_cn="ferry-source"
days=365
ca_from=""
expired=0
force=0

while [ $# -gt 0 ]; do
	case "$1" in
	-h | --help) usage; exit 0 ;;
	--server-name) need_arg "$@"; server_names+=("$2"); shift 2 ;;
	--server-name=*) server_names+=("${1#*=}"); shift ;;
	--client-cn) need_arg "$@"; client_cn=$2; shift 2 ;;
	--client-cn=*) client_cn=${1#*=}; shift ;;
	--days) need_arg "$@"; days=$2; shift 2 ;;
	--days=*) days=${1#*=}; shift ;;
	--ca-from) need_arg "$@"; ca_from=$2; shift 2 ;;
	--ca-from=*) ca_from=${1#*=}; shift ;;
	--expired) expired=1; shift ;;
	--force) force=1; shift ;;
	--) shift; break ;;
	-*) die "unknown option $1 (see --help)" ;;
	*)
		[ -z "$dir" ] || die "more than one DIR given ($dir, $1)"
		dir=$1; shift ;;
	esac
done
if [ $# -gt 0 ]; then
	if [ -n "$dir" ] || [ $# -gt 1 ]; then die "more than one DIR given"; fi
	dir=$1
fi
[ -n "$dir" ] || die "no DIR given (see --help)"

if ! [[ $days =~ ^[0-9]{1,5}$ ]] || [ "$days" -lt 1 ] || [ "$days" -gt 36500 ]; then
	die "--days wants a whole number from 1 to 36500, not '$days'"
fi
if [ -z "$client_cn" ] || [ ${#client_cn} -gt 64 ]; then
	die "--client-cn wants 1 to 64 characters"
fi
[[ $client_cn != *[[:cntrl:]]* ]] || die "--client-cn has a control character"
command -v openssl >/dev/null 2>&1 || die "openssl not found"

# The server's subjectAltName entries, without duplicates: IP addresses
# (IPv4 dotted quads, or anything with a colon, brackets stripped) as IP:,
# the rest as DNS: names.
san_dns=()
san_ip=()
add_san() {
	local n=$1 x
	if [[ $n =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || [[ $n == *:* ]]; then
		n=${n#[}; n=${n%]}
		[[ $n =~ ^[0-9A-Fa-f:.]+$ ]] || die "bad IP address '$1'"
		for x in ${san_ip[@]+"${san_ip[@]}"}; do [ "$x" != "$n" ] || return 0; done
		san_ip+=("$n")
	else
		[[ $n =~ ^[A-Za-z0-9*_.-]+$ ]] || die "bad --server-name '$1' (want a host name or IP address)"
		for x in ${san_dns[@]+"${san_dns[@]}"}; do [ "$x" != "$n" ] || return 0; done
		san_dns+=("$n")
	fi
}
add_san localhost
add_san 127.0.0.1
add_san ::1
server_cn=localhost
if [ ${#server_names[@]} -gt 0 ]; then
	for n in "${server_names[@]}"; do add_san "$n"; done
	server_cn=${server_names[0]}
	server_cn=${server_cn#[}; server_cn=${server_cn%]}
	[ ${#server_cn} -le 64 ] || die "first --server-name is longer than the 64 characters a CN may have"
fi

if [ -n "$ca_from" ]; then
	[ -f "$ca_from/ca-cert.pem" ] || die "$ca_from/ca-cert.pem not found"
	[ -f "$ca_from/ca-key.pem" ] || die "$ca_from/ca-key.pem not found (--ca-from needs the CA's key)"
fi
if [ "$force" -eq 0 ]; then
	for f in ca-cert.pem ca-key.pem; do
		[ ! -e "$dir/$f" ] || die "$dir/$f exists; pass --force to overwrite"
	done
fi

umask 077
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gen-certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Run an openssl command quietly; show its output only when it fails.
ossl() {
	if ! openssl "$@" >"$tmp/log" 2>&1; then
		cat "$tmp/log" >&2
		die "openssl $1 failed"
	fi
}

# A -subj value with one CN; '\', '/' and '+' (which OpenSSL 3.0 always
# reads as a multi-valued RDN) escaped.
subj_cn() {
	local v=${1//\\/\\\\}
	v=${v//\//\\/}
	printf '/CN=%s' "${v//+/\\+}"
}

newkey() {
	ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
		-pkeyopt ec_param_enc:named_curve -out "$1"
}

# A throwaway configuration for `openssl req` and `openssl ca`: nothing is
# read from the system's openssl.cnf, and the CA database lives in $tmp.
{
	cat <<-EOF
	[req]
	distinguished_name = req_dn
	[req_dn]

	[ca]
	default_ca = ferry_ca
	[ferry_ca]
	database = $tmp/index.txt
	serial = $tmp/serial
	new_certs_dir = $tmp/issued
	unique_subject = no
	policy = policy_cn
	email_in_dn = no
	[policy_cn]
	commonName = supplied

	[ca_ext]
	basicConstraints = critical, CA:TRUE
	keyUsage = critical, keyCertSign, cRLSign
	subjectKeyIdentifier = hash
	authorityKeyIdentifier = keyid:always

	# keyEncipherment is meaningless for an EC key, but QEMU's sanity check of
	# tls-creds-x509 wants it in a critical keyUsage; TLS ignores it.
	[server_ext]
	basicConstraints = critical, CA:FALSE
	keyUsage = critical, digitalSignature, keyEncipherment
	extendedKeyUsage = serverAuth
	subjectKeyIdentifier = hash
	authorityKeyIdentifier = keyid, issuer
	subjectAltName = @server_san
	[client_ext]
	basicConstraints = critical, CA:FALSE
	keyUsage = critical, digitalSignature, keyEncipherment
	extendedKeyUsage = clientAuth
	subjectKeyIdentifier = hash
	authorityKeyIdentifier = keyid, issuer
	[server_san]
	EOF
	i=1
	for n in "${san_dns[@]}"; do echo "DNS.$i = $n"; i=$((i + 1)); done
	i=1
	for n in "${san_ip[@]}"; do echo "IP.$i = $n"; i=$((i + 1)); done
} >"$tmp/openssl.cnf"
cnf=$tmp/openssl.cnf

# The CA: a new one, or the one of --ca-from.
if [ -n "$ca_from" ]; then
	cp "$ca_from/ca-cert.pem" "$tmp/ca-cert.pem"
	cp "$ca_from/ca-key.pem" "$tmp/ca-key.pem"
	openssl x509 -in "$tmp/ca-cert.pem" -noout -pubkey >"$tmp/pub1" 2>"$tmp/log" ||
		{ cat "$tmp/log" >&2; die "$ca_from/ca-cert.pem is not a certificate"; }
	openssl pkey -in "$tmp/ca-key.pem" -pubout >"$tmp/pub2" 2>"$tmp/log" ||
		{ cat "$tmp/log" >&2; die "$ca_from/ca-key.pem is not a private key"; }
	cmp -s "$tmp/pub1" "$tmp/pub2" ||
		die "$ca_from/ca-key.pem is not the key of $ca_from/ca-cert.pem"
else
	newkey "$tmp/ca-key.pem"
	ossl req -config "$cnf" -new -x509 -key "$tmp/ca-key.pem" -sha256 \
		-days "$days" -subj "$(subj_cn "ferry test CA $(openssl rand -hex 4)")" \
		-extensions ca_ext -out "$tmp/ca-cert.pem"
fi

# The server and client certificates, issued by `openssl ca` (which, unlike
# `openssl x509 -req` in OpenSSL 3.0, can set any notBefore/notAfter).
: >"$tmp/index.txt"
mkdir "$tmp/issued"
openssl rand -hex 16 >"$tmp/serial"
if [ "$expired" -eq 1 ]; then
	validity=(-startdate 20200101000000Z -enddate 20200102000000Z)
else
	validity=(-days "$days")
fi
issue() { # NAME CN EXTENSIONS
	newkey "$tmp/$1-key.pem"
	ossl req -config "$cnf" -new -key "$tmp/$1-key.pem" -subj "$(subj_cn "$2")" \
		-out "$tmp/$1.csr"
	ossl ca -config "$cnf" -batch -notext -md sha256 "${validity[@]}" \
		-cert "$tmp/ca-cert.pem" -keyfile "$tmp/ca-key.pem" \
		-extensions "$3" -in "$tmp/$1.csr" -out "$tmp/$1-cert.pem"
}
issue server "$server_cn" server_ext
issue client "$client_cn" client_ext

# Into DIR: keys 0600, certificates 0644, ca-cert.pem last (its presence
# marks a complete set). A --ca-from set has no CA key of its own: remove a
# stale one (only there with --force), unless it is the --ca-from key itself.
mkdir -p "$dir"
chmod 600 "$tmp"/*-key.pem
chmod 644 "$tmp"/*-cert.pem
for f in server-key.pem server-cert.pem client-key.pem client-cert.pem; do
	mv -f "$tmp/$f" "$dir/$f"
done
if [ -z "$ca_from" ]; then
	mv -f "$tmp/ca-key.pem" "$dir/ca-key.pem"
elif [ -e "$dir/ca-key.pem" ] && ! [ "$dir/ca-key.pem" -ef "$ca_from/ca-key.pem" ]; then
	rm -f "$dir/ca-key.pem"
fi
mv -f "$tmp/ca-cert.pem" "$dir/ca-cert.pem"

# Summary.
show() { # FILE WHAT
	local subj start end
	subj=$(openssl x509 -in "$dir/$1" -noout -subject -nameopt RFC2253)
	start=$(openssl x509 -in "$dir/$1" -noout -startdate -dateopt iso_8601)
	end=$(openssl x509 -in "$dir/$1" -noout -enddate -dateopt iso_8601)
	printf '  %-16s %s, %s\n' "$1" "$2" "${subj#subject=}"
	printf '  %-16s valid %s to %s\n' "" "${start#notBefore=}" "${end#notAfter=}"
}
echo "$prog: wrote $dir:"
if [ -n "$ca_from" ]; then
	show ca-cert.pem "CA copied from $ca_from (key not copied)"
else
	show ca-cert.pem "new CA (key in ca-key.pem)"
fi
show server-cert.pem "server"
sans=$(openssl x509 -in "$dir/server-cert.pem" -noout -ext subjectAltName | sed -n '2,$s/^ *//p')
printf '  %-16s SAN %s\n' "" "$sans"
show client-cert.pem "client"
[ "$expired" -eq 0 ] || echo "  (server and client certificates expired on purpose: --expired)"
