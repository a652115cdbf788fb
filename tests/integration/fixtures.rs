//! The development IdP and route files that use it, shared by the auth and
//! exchange tests.

use http::Request;
use oboe::dev::idp::{Client as IdpClientReg, DevIdp, Mint};

use crate::harness::{Client, Reply, TestBody, empty};

/// oboe's own client id in the tests.
pub const CLIENT_ID: &str = "6a1f0c2e-3b4d-4e5f-8a9b-0c1d2e3f4a5b";
/// oboe's client secret at the dev IdP.
pub const SECRET: &str = "dev-secret-value-Zq8~x";

/// The audience callers' tokens are minted for.
pub fn api_audience() -> String {
    format!("api://{CLIENT_ID}")
}

/// A user token for oboe's API with `access_as_user`.
pub fn user_mint() -> Mint {
    Mint::user(api_audience()).scopes(["access_as_user"])
}

/// A started dev IdP with oboe registered under a client secret.
pub async fn idp() -> DevIdp {
    let idp = DevIdp::start().await.expect("start the dev IdP");
    idp.register_client(IdpClientReg::secret(CLIENT_ID, SECRET));
    idp
}

/// Writes the client secret to a file and returns its directory and path.
pub fn secret_file() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("client-secret");
    std::fs::write(&path, format!("{SECRET}\n")).expect("write secret");
    let path = path.to_str().expect("utf-8 path").to_owned();
    (dir, path)
}

/// An Entra identity section for `tenant` at the dev IdP, with `credential`
/// (YAML under `credential:`, or empty for none) and extra identity keys.
pub fn entra_identity(idp: &DevIdp, tenant: &str, credential: &str) -> String {
    let mut out = format!(
        "identity:\n  provider: entra\n  instance: {}\n  tenant_id: {tenant}\n  client_id: {CLIENT_ID}\n  timeout: 2s\n",
        idp.base_url()
    );
    if !credential.is_empty() {
        out.push_str(&format!("  credential:\n    {credential}\n"));
    }
    out.push_str("inbound:\n  algorithms: [RS256, PS256, ES256]\n");
    out
}

/// A route with a caller section and a token section (flow YAML).
pub fn route(name: &str, prefix: &str, upstream: &str, caller: &str, token: &str) -> String {
    format!(
        "  - name: {name}\n    path_prefix: {prefix}\n    upstream: {upstream}\n    caller: {caller}\n    token: {token}\n"
    )
}

/// `GET url` with `Authorization: Bearer token`.
pub fn bearer_get(url: &str, token: &str) -> Request<TestBody> {
    Request::get(url)
        .header("authorization", format!("Bearer {token}"))
        .body(empty())
        .expect("request")
}

/// Sends `GET url` with the bearer token.
pub async fn call(url: &str, token: &str) -> Reply {
    Client::http1().send(bearer_get(url, token)).await
}
