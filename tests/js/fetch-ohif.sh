#!/usr/bin/env bash
# The prebuilt OHIF viewer for tests/viewer: npm's @ohif/app tarball, pinned by version and
# integrity, unpacked to tests/js/ohif/dist (its dependencies are not needed: dist/ is the viewer).
set -euo pipefail
cd "$(dirname "$0")"
VERSION=3.13.2
INTEGRITY="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
if [ -f ohif/VERSION ] && [ "$(cat ohif/VERSION)" = "$VERSION" ]; then exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
npm pack "@ohif/app@$VERSION" --pack-destination "$tmp" --silent >/dev/null
tarball="$tmp/ohif-app-$VERSION.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
if [ "$got" != "$INTEGRITY" ]; then
  echo "fetch-ohif: @ohif/app@$VERSION does not match its pinned integrity" >&2
  exit 1
fi
rm -rf ohif
mkdir ohif
tar xzf "$tarball" -C ohif --strip-components=1 package/dist package/LICENSE
echo "$VERSION" > ohif/VERSION
