"""HTTP helpers for the system tests: reading a raw HTTP/1.0 response (what a request
over bash's /dev/tcp on a node returns) and a GET on the host."""

import json
import shlex
import urllib.error
import urllib.request

# A GET of a proxy's admin /config with bash alone (the image has no HTTP client), as a
# command line for a remote shell of any kind.
PROXY_CONFIG_OVER_BASH = "bash -c " + shlex.quote(
    "exec 3<>/dev/tcp/127.0.0.1/4191 && printf 'GET /config HTTP/1.0\\r\\n\\r\\n' >&3 && cat <&3")


def body_of(raw):
    """The body of a raw HTTP response (line ends CRLF or, after ssh, LF)."""
    return raw.replace("\r\n", "\n").partition("\n\n")[2]


def json_body(raw):
    """The JSON body of a raw HTTP response, None when it is not JSON."""
    try:
        return json.loads(body_of(raw))
    except ValueError:
        return None


def get(url, timeout=2):
    """(status, body bytes) of one GET from the host, without proxies from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
