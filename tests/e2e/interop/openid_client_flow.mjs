// The whole authorization code flow with npm openid-client 6 (nobody on the team wrote it) against a
// live trustplane: RFC 8414 discovery, PAR (RFC 9126) with private_key_jwt client authentication,
// PKCE S256, DPoP (RFC 9449) at /par and /token, the code grant, a refresh, then a DPoP-protected
// resource request. Driven by tests/e2e/test_interop_openid_client.py over stdin/stdout, one JSON
// object per line: the script prints {"authorize": URL}, reads the callback URL back on stdin, and
// prints {"result": {...}} at the end. Errors: {"error": "..."} and exit code 1.
//
// Input (environment): TP_ISSUER, TP_CLIENT_ID, TP_CLIENT_KEY (PKCS#8 PEM, ES256), TP_KID,
// TP_REDIRECT_URI, TP_SCOPE, TP_RESOURCE, TP_RS_URL (a PEP-protected resource URL).
import * as readline from 'node:readline';
import * as crypto from 'node:crypto';
import * as client from 'openid-client';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const say = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');
const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const decode = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());

async function main() {
  const issuer = new URL(env('TP_ISSUER'));
  const key = crypto.createPrivateKey(env('TP_CLIENT_KEY'));
  const privateKey = await crypto.subtle.importKey(
    'pkcs8', key.export({ format: 'der', type: 'pkcs8' }),
    { name: 'ECDSA', namedCurve: 'P-256' }, false, ['sign'],
  );
  const loopback = issuer.protocol === 'http:' ? [client.allowInsecureRequests] : [];
  const config = await client.discovery(
    issuer, env('TP_CLIENT_ID'), { redirect_uris: [env('TP_REDIRECT_URI')] },
    client.PrivateKeyJwt({ key: privateKey, kid: env('TP_KID') }),
    { algorithm: 'oauth2', execute: loopback },
  );
  const DPoP = client.getDPoPHandle(config, await client.randomDPoPKeyPair('ES256'));
  const verifier = client.randomPKCECodeVerifier();
  const state = client.randomState();
  const resource = env('TP_RESOURCE');
  const url = await client.buildAuthorizationUrlWithPAR(config, {
    redirect_uri: env('TP_REDIRECT_URI'),
    scope: env('TP_SCOPE'),
    resource,
    state,
    code_challenge: await client.calculatePKCECodeChallenge(verifier),
    code_challenge_method: 'S256',
  }, { DPoP });
  say({ authorize: url.href });
  const callback = (await lines.next()).value;
  const tokens = await client.authorizationCodeGrant(
    config, new URL(callback), { pkceCodeVerifier: verifier, expectedState: state },
    { resource }, { DPoP },
  );
  const refreshed = await client.refreshTokenGrant(config, tokens.refresh_token, { resource }, { DPoP });
  const protectedResponse = await client.fetchProtectedResource(
    config, refreshed.access_token, new URL(env('TP_RS_URL')), 'GET', undefined, undefined, { DPoP },
  );
  say({
    result: {
      token_type: tokens.token_type,
      cnf: decode(tokens.access_token).cnf,
      refreshed_token_type: refreshed.token_type,
      refreshed_cnf: decode(refreshed.access_token).cnf,
      refreshed_access_token: refreshed.access_token,
      resource_status: protectedResponse.status,
      resource_body: await protectedResponse.json(),
      par_endpoint: config.serverMetadata().pushed_authorization_request_endpoint,
    },
  });
}

main().then(() => process.exit(0), (err) => {
  say({ error: `${err.name}: ${err.message}`, code: err.code, cause: String(err.cause?.error ?? err.cause ?? '') });
  process.exit(1);
});
