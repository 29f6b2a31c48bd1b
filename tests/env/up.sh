#!/usr/bin/env bash
# Starts the real components the tests use, all on loopback, in $GPU_TRAINER_ENV_DIR:
#   etcd, kube-apiserver (token auth, RBAC, ServiceAccount tokens, an audit log of ServiceAccount
#   requests), kube-controller-manager (garbage collector, namespace deletion), an OpenSSH sshd with
#   generated host and user keys, and a single-node Garage (S3, checks SigV4).
# Kubernetes is the newest release of tests/env/versions.env unless GPU_TRAINER_KUBE_VERSION names
# another one install.sh built (the oldest supported minor: KUBE_OLDEST_VERSION).
# Writes $GPU_TRAINER_ENV_DIR/env (shell exports) and $GPU_TRAINER_ENV_DIR/kubeconfig, and each
# component's command line as cmd/NAME (tests/env/restart.sh starts it again from there).
# Stop everything with tests/env/down.sh. Run tests/env/install.sh first.
set -euo pipefail

CACHE="${GPU_TRAINER_CACHE:-$HOME/.cache/gpu-trainer}"
ENV_DIR="${GPU_TRAINER_ENV_DIR:-/tmp/gpu-trainer-env}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$HERE/versions.env"
KUBE_RELEASE="${GPU_TRAINER_KUBE_VERSION:-$KUBE_VERSION}"
# The API server is the selected release's; etcd, the controller manager (garbage collector and
# namespace deletion only) and kubectl are always the newest release's: install.sh builds just
# kube-apiserver for the oldest minor, whose validation and RBAC are what the tests there prove.
APISERVER_BIN="$CACHE/kube-$KUBE_RELEASE/bin"
KUBE_BIN="$CACHE/kube-$KUBE_VERSION/bin"
GARAGE="$CACHE/garage-$GARAGE_VERSION/bin/garage"

log() { printf '[env] %s\n' "$*" >&2; }

"$HERE/down.sh" >/dev/null 2>&1 || true
rm -rf "$ENV_DIR"
mkdir -p "$ENV_DIR"/{pki,etcd,logs,ssh,pids,garage,cmd}
cd "$ENV_DIR"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "timed out waiting for $what"; return 1; fi
    sleep 0.5
  done
}

start() { # start NAME COMMAND...: background process with its log and pid file
  # The exact command (and this folder as its working directory) is kept as cmd/NAME, so
  # tests/env/restart.sh can start it again later on the same port with the same flags.
  local name=$1; shift
  {
    printf '#!/usr/bin/env bash\n# Written by tests/env/up.sh: how %s was started.\ncd %q\nexec' "$name" "$ENV_DIR"
    printf ' %q' "$@"
    printf '\n'
  } > "cmd/$name"
  chmod 700 "cmd/$name"
  setsid "cmd/$name" >"logs/$name.log" 2>&1 < /dev/null &
  echo $! > "pids/$name.pid"
}

# --- certificates: a throwaway CA and a server certificate for 127.0.0.1 ---
openssl ecparam -name prime256v1 -genkey -noout -out pki/ca.key 2>/dev/null
openssl req -x509 -new -key pki/ca.key -subj /CN=gpu-trainer-test-ca -days 30 -out pki/ca.crt 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out pki/apiserver.key 2>/dev/null
openssl req -new -key pki/apiserver.key -subj /CN=kube-apiserver -out pki/apiserver.csr 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' > pki/ext.cnf
openssl x509 -req -in pki/apiserver.csr -CA pki/ca.crt -CAkey pki/ca.key -CAcreateserial -days 30 \
  -extfile pki/ext.cnf -out pki/apiserver.crt 2>/dev/null
openssl genrsa -out pki/sa.key 2048 2>/dev/null
openssl rsa -in pki/sa.key -pubout -out pki/sa.pub 2>/dev/null

ADMIN_TOKEN=$(openssl rand -hex 24)
printf '%s,admin,admin-uid,"system:masters"\n' "$ADMIN_TOKEN" > pki/tokens.csv
chmod 600 pki/tokens.csv

# Requests made as a ServiceAccount are audited (metadata only: never request or response bodies,
# so no Secret data), so tests can show which permissions an operator's role really uses.
# Everything else, the admin token's traffic included, is not logged.
cat > pki/audit-policy.yaml <<'AP'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: ["system:serviceaccounts"]
- level: None
AP

# --- etcd ---
ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port)
start etcd "$KUBE_BIN/etcd" --name test --data-dir "$ENV_DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "test=http://127.0.0.1:$ETCD_PEER_PORT" --log-level warn
wait_for 30 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"

# --- kube-apiserver ---
API_PORT=$(free_port)
start kube-apiserver "$APISERVER_BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
  --endpoint-reconciler-type none \
  --tls-cert-file pki/apiserver.crt --tls-private-key-file pki/apiserver.key \
  --client-ca-file pki/ca.crt \
  --token-auth-file pki/tokens.csv --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file pki/sa.pub \
  --service-account-signing-key-file pki/sa.key --service-cluster-ip-range 10.96.0.0/24 \
  --api-audiences https://kubernetes.default.svc \
  --audit-policy-file pki/audit-policy.yaml --audit-log-path "$ENV_DIR/logs/audit.log" \
  --disable-admission-plugins ServiceAccount --enable-priority-and-fairness=false \
  --enable-admission-plugins OwnerReferencesPermissionEnforcement \
  --v 1
wait_for 120 kube-apiserver curl -sf --cacert pki/ca.crt -H "Authorization: Bearer $ADMIN_TOKEN" \
  "https://127.0.0.1:$API_PORT/readyz"

cat > kubeconfig <<KC
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(base64 -w0 pki/ca.crt)
users:
- name: admin
  user:
    token: $ADMIN_TOKEN
contexts:
- name: test
  context: {cluster: test, user: admin, namespace: default}
current-context: test
KC
chmod 600 kubeconfig

# --- kube-controller-manager: garbage collector (owner references cascade) and namespace deletion
# (no `default` ServiceAccounts are made: the serviceaccount controller is off; tests get
# ServiceAccount tokens from the TokenRequest API) ---
start kube-controller-manager "$KUBE_BIN/kube-controller-manager" \
  --kubeconfig "$ENV_DIR/kubeconfig" --controllers garbage-collector-controller,namespace-controller \
  --root-ca-file pki/ca.crt --secure-port 0 --leader-elect=false --v 1
wait_for 30 kube-controller-manager pgrep -F pids/kube-controller-manager.pid

# --- sshd on loopback with its own host key and a generated user key ---
# Every SSH command runs root's ~/.bashrc, whose `pyenv init` rehashes under a lock file; a shell
# killed mid-rehash leaves the lock behind and every later SSH session then waits on it. Clear a
# stale one (older than a minute) so the suite does not hang on a machine left in that state.
shim_lock="${PYENV_ROOT:-$HOME/.pyenv}/shims/.pyenv-shim"
if [ -e "$shim_lock" ] && [ -n "$(find "$shim_lock" -mmin +1 2>/dev/null)" ]; then
  log "removing a stale pyenv rehash lock ($shim_lock)"
  rm -f "$shim_lock"
fi
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f ssh/host_ed25519_key
ssh-keygen -q -t ed25519 -N '' -f ssh/user_ed25519 -C gpu-trainer-test
cp ssh/user_ed25519.pub ssh/authorized_keys
chmod 600 ssh/authorized_keys
SSH_PORT=$(free_port)
cat > ssh/sshd_config <<SC
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $ENV_DIR/ssh/host_ed25519_key
AuthorizedKeysFile $ENV_DIR/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile $ENV_DIR/pids/sshd-daemon.pid
Subsystem sftp internal-sftp
MaxStartups 200:30:400
MaxSessions 200
LogLevel ERROR
SC
# Extra sshd_config lines from the caller (tests/bench.sh uses this; the tests do not).
if [ -n "${GPU_TRAINER_SSHD_EXTRA:-}" ]; then
  printf '%s\n' "$GPU_TRAINER_SSHD_EXTRA" >> ssh/sshd_config
fi
start sshd /usr/sbin/sshd -D -e -f "$ENV_DIR/ssh/sshd_config"
wait_for 15 sshd bash -c "exec 3<>/dev/tcp/127.0.0.1/$SSH_PORT"

# --- Garage: single node on loopback, sqlite, one key with read/write/owner on one bucket ---
S3_PORT=$(free_port); GARAGE_RPC_PORT=$(free_port); GARAGE_ADMIN_PORT=$(free_port)
S3_REGION=garage
cat > garage/garage.toml <<GT
metadata_dir = "$ENV_DIR/garage/meta"
data_dir = "$ENV_DIR/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$GARAGE_RPC_PORT"
rpc_public_addr = "127.0.0.1:$GARAGE_RPC_PORT"
rpc_secret = "$(openssl rand -hex 32)"

[s3_api]
s3_region = "$S3_REGION"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$GARAGE_ADMIN_PORT"
admin_token = "$(openssl rand -hex 24)"
GT
chmod 600 garage/garage.toml
garage_cli() { "$GARAGE" -c "$ENV_DIR/garage/garage.toml" "$@"; }
start garage "$GARAGE" -c "$ENV_DIR/garage/garage.toml" server
wait_for 60 garage garage_cli status
NODE_ID=$(garage_cli node id -q 2>/dev/null | cut -d@ -f1)
garage_cli layout assign -z dc1 -c 1G "$NODE_ID" >/dev/null
garage_cli layout apply --version 1 >/dev/null
S3_KEY_JSON=$(garage_cli json-api CreateKey '{"name":"gpu-trainer-test"}')
S3_KEY_ID=$(printf '%s' "$S3_KEY_JSON" | jq -r .accessKeyId)
S3_SECRET=$(printf '%s' "$S3_KEY_JSON" | jq -r .secretAccessKey)
S3_BUCKET=gpu-trainer-test
garage_cli bucket create "$S3_BUCKET" >/dev/null
garage_cli bucket allow --read --write --owner "$S3_BUCKET" --key "$S3_KEY_ID" >/dev/null
wait_for 30 "garage S3 API" curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/"

cat > env <<EV
export GPU_TRAINER_ENV_DIR=$ENV_DIR
# The test environment's kubectl comes first, whatever kubectl the machine has.
export PATH=$KUBE_BIN:\$PATH
export GPU_TRAINER_TEST_KUBE_VERSION=$KUBE_RELEASE
export GPU_TRAINER_TEST_HELM3=$CACHE/helm-$HELM3_VERSION/bin/helm
export GPU_TRAINER_TEST_HELM4=$CACHE/helm-$HELM4_VERSION/bin/helm
export KUBECONFIG=$ENV_DIR/kubeconfig
export GPU_TRAINER_TEST_AUDIT_LOG=$ENV_DIR/logs/audit.log
export GPU_TRAINER_TEST_SSH_HOST=127.0.0.1
export GPU_TRAINER_TEST_SSH_PORT=$SSH_PORT
export GPU_TRAINER_TEST_SSH_USER=$(id -un)
export GPU_TRAINER_TEST_SSH_KEY=$ENV_DIR/ssh/user_ed25519
export GPU_TRAINER_TEST_SSH_HOST_KEY=$ENV_DIR/ssh/host_ed25519_key.pub
export GPU_TRAINER_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export GPU_TRAINER_TEST_S3_REGION=$S3_REGION
export GPU_TRAINER_TEST_S3_ACCESS_KEY_ID=$S3_KEY_ID
export GPU_TRAINER_TEST_S3_SECRET_ACCESS_KEY=$S3_SECRET
export GPU_TRAINER_TEST_S3_BUCKET=$S3_BUCKET
export GPU_TRAINER_TEST_GARAGE_CONFIG=$ENV_DIR/garage/garage.toml
EV
chmod 600 env
# What tests/env/restart.sh needs to tell that a restarted component answers again.
cat > components.env <<CE
API_PORT=$API_PORT
ADMIN_TOKEN=$ADMIN_TOKEN
SSH_PORT=$SSH_PORT
ETCD_PORT=$ETCD_PORT
CE
chmod 600 components.env
log "up: kube-apiserver v$KUBE_RELEASE https://127.0.0.1:$API_PORT, sshd 127.0.0.1:$SSH_PORT, garage S3 http://127.0.0.1:$S3_PORT (source $ENV_DIR/env)"
