#!/usr/bin/env python3
"""A token issuer for the registry's `auth: token` mode (the distribution token spec), for tests.

Usage: token_issuer.py PORT KEY.pem CERT.pem TTL_SECONDS COUNT_FILE
GET /token?service=...&scope=... -> {"token": <RS256 JWT with x5c>, "expires_in": TTL}
Grants what the scope asks. Signs with `openssl dgst -sha256 -sign` (PKCS#1 v1.5 = RS256).
Each token issued bumps the number in COUNT_FILE.
"""
import base64, json, os, subprocess, sys, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse, parse_qs

port, key, cert, ttl, count_file = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
der = subprocess.run(["openssl", "x509", "-in", cert, "-outform", "DER"], check=True, capture_output=True).stdout

def b64(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

issued = 0

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        global issued
        u = urlparse(self.path)
        if u.path != "/token":
            self.send_response(404); self.end_headers(); return
        q = parse_qs(u.query)
        access = []
        for s in q.get("scope", []):
            kind, name, actions = s.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {"iss": "lsm-test-issuer", "sub": "lsm", "aud": q.get("service", [""])[0],
                  "exp": now + ttl, "nbf": now - 5, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = (b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())).encode()
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key], input=signing_input,
                             check=True, capture_output=True).stdout
        token = signing_input.decode() + "." + b64(sig)
        body = json.dumps({"token": token, "expires_in": ttl}).encode()
        issued += 1
        with open(count_file + ".tmp", "w") as f:
            f.write(str(issued))
        os.replace(count_file + ".tmp", count_file)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
