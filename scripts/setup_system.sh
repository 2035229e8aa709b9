#!/usr/bin/env bash
# System packages the tests and the JDBC source need, installed only if missing (idempotent):
#   - PostgreSQL server binaries (initdb, pg_ctl, psql): the JDBC tests start a throwaway server on
#     127.0.0.1 with a temp data dir. No cluster is created or started by the install.
#   - libpostgresql-jdbc-java: the JDBC driver jar /usr/share/java/postgresql.jar (data.jdbc.driver_jar).
#   - shellcheck: the tests lint the project's shell scripts (docker/, scripts/, .ci/) with it.
#   - chromium + chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver): the map tests open the
#     interactive map in headless Chromium through Selenium.
# Debian/Ubuntu (apt-get). Run as root, or with sudo available.
set -euo pipefail

have_pg() { command -v initdb >/dev/null 2>&1 || compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; }
have_jar() { [ -f /usr/share/java/postgresql.jar ]; }
have_shellcheck() { command -v shellcheck >/dev/null 2>&1; }
have_chromium() { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }

if have_pg && have_jar && have_shellcheck && have_chromium; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "error: PostgreSQL server, /usr/share/java/postgresql.jar, shellcheck and chromium are needed and apt-get is not available;" >&2
  echo "       install a PostgreSQL server (initdb, pg_ctl), the PostgreSQL JDBC driver, shellcheck and Chromium with chromedriver by hand." >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "error: installing postgresql, libpostgresql-jdbc-java, shellcheck and chromium needs root (or sudo)." >&2; exit 1
  fi
fi
pkgs=()
have_pg || pkgs+=(postgresql)
have_jar || pkgs+=(libpostgresql-jdbc-java)
have_shellcheck || pkgs+=(shellcheck)
have_chromium || pkgs+=(chromium chromium-driver)
# Don't let the package create and start a default cluster on port 5432: the tests run their own.
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
  $SUDO mkdir -p /etc/postgresql-common
  echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${pkgs[@]}"
if ! { have_pg && have_jar && have_shellcheck && have_chromium; }; then
  echo "error: install finished but initdb, postgresql.jar, shellcheck or chromium/chromedriver is still missing" >&2
  exit 1
fi
