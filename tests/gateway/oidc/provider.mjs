// The OpenID Connect provider of the gateway's tests: panva's certified oidc-provider (v9),
// on loopback, with one client, two projects and four users whose ID and access tokens carry
// their roles (Keycloak's `realm_access.roles`) and projects (`projects`).
//
//   node provider.mjs <node_modules dir> [client secret]
//
// Listens on a free port of 127.0.0.1 and prints one JSON line {"issuer": ...} when ready.
// The login page is oidc-provider's development interaction (any password is accepted):
// these are test users, never a deployment's.
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { generateKeyPairSync } from 'node:crypto';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';

const [modules, secret = 'kaapana-test-secret'] = process.argv.slice(2);
if (!modules) {
  console.error('usage: node provider.mjs <node_modules dir> [client secret]');
  process.exit(2);
}
const require = createRequire(join(resolve(modules), 'noop.js'));
const { Provider, interactionPolicy } = await import(pathToFileURL(require.resolve('oidc-provider')).href);

// The login is the one interaction: native clients are otherwise asked to consent every time.
const policy = interactionPolicy.base();
policy.get('consent').checks.remove('native_client_prompt');

// The resource server the access tokens are for (their `aud`): the gateway.
const AUDIENCE = 'urn:kaapana:platform';
const SCOPE = 'openid profile kaapana';

const USERS = {
  admin: { name: 'Ada Admin', roles: ['admin'], projects: ['proj-a', 'proj-b'] },
  'manager-a': { name: 'Pia Manager', roles: ['project-manager'], projects: ['proj-a'] },
  'scientist-a': { name: 'Sam Scientist', roles: ['scientist'], projects: ['proj-a'] },
  'viewer-a': { name: 'Vic Viewer', roles: ['viewer'], projects: ['proj-a'] },
};

function claimsOf(sub) {
  const user = USERS[sub];
  return {
    sub,
    name: user.name,
    preferred_username: sub,
    realm_access: { roles: user.roles },
    projects: user.projects,
  };
}

const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: 'test-key', use: 'sig', alg: 'RS256' };

const server = createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const issuer = `http://127.0.0.1:${server.address().port}`;

// Both clients alike. A native client's loopback redirect URI matches on any port (RFC 8252
// 7.3): the gateway of a test listens on a free port chosen after the provider started.
const client = {
  client_secret: secret,
  application_type: 'native',
  redirect_uris: ['http://127.0.0.1/auth/callback'],
  grant_types: ['authorization_code'],
  response_types: ['code'],
  token_endpoint_auth_method: 'client_secret_basic',
};

const provider = new Provider(issuer, {
  clients: [
    { client_id: 'kaapana', ...client },
    // Tokens that expire one second after they are issued, for the tests of expiry.
    { client_id: 'kaapana-short', ...client },
  ],
  interactions: { policy },
  jwks: { keys: [signingKey] },
  cookies: { keys: ['kaapana-test-cookie-key'] },
  scopes: ['openid', 'profile', 'kaapana'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username'],
    kaapana: ['realm_access', 'projects'],
  },
  // Roles and projects in the ID token too (as Keycloak's mappers put them there).
  conformIdTokenClaims: false,
  pkce: { required: () => false },
  async findAccount(ctx, sub) {
    if (!USERS[sub]) return undefined;
    return { accountId: sub, claims: async () => claimsOf(sub) };
  },
  // Every user consents to the one client: the login is the only interaction.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) return ctx.oidc.provider.Grant.find(grantId);
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope(SCOPE);
    grant.addOIDCClaims(['realm_access', 'projects', 'name', 'preferred_username']);
    grant.addResourceScope(AUDIENCE, SCOPE);
    await grant.save();
    return grant;
  },
  // Access tokens are JWTs for the gateway, carrying the same roles and projects.
  async extraTokenClaims(ctx, token) {
    if (!token.accountId || !USERS[token.accountId]) return undefined;
    const { realm_access: realmAccess, projects, preferred_username: username } = claimsOf(token.accountId);
    return { realm_access: realmAccess, projects, preferred_username: username };
  },
  features: {
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: async () => AUDIENCE,
      useGrantedResource: async () => true,
      getResourceServerInfo: async (ctx, resource, client) => ({
        scope: SCOPE,
        audience: AUDIENCE,
        accessTokenFormat: 'jwt',
        accessTokenTTL: client.clientId === 'kaapana-short' ? 1 : 3600,
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  ttl: {
    IdToken: (ctx, token, client) => (client.clientId === 'kaapana-short' ? 1 : 3600),
  },
});
provider.on('server_error', (ctx, error) => console.error('oidc-provider server_error', error));
server.on('request', provider.callback());
console.log(JSON.stringify({ issuer, users: Object.keys(USERS) }));
