//! The development IdP, driven over real HTTP on loopback.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{self as sig, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Value, json};

use super::jose::b64url;
use super::*;

/// oboe's own app registration in these tests.
const API: &str = "11111111-2222-4333-8444-555555555555";
const SECRET: &str = "s3cr3t+with/odd=chars&more%";
const GRAPH_READ: &str = "https://graph.microsoft.com/User.Read";

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("JSON body")
    }

    fn header(&self, name: http::header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The AADSTS number of an Entra error.
    fn code(&self) -> u64 {
        self.json()["error_codes"][0].as_u64().unwrap_or_default()
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_default().to_owned()
    }
}

async fn send(request: Request<Full<Bytes>>) -> Answer {
    let client: HttpClient<HttpConnector, Full<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build_http();
    let response = client.request(request).await.expect("IdP answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("read body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(url: &str) -> Answer {
    send(
        Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("request"),
    )
    .await
}

async fn post_raw(
    url: &str,
    content_type: &str,
    body: String,
    authorization: Option<&str>,
) -> Answer {
    let mut request = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header(CONTENT_TYPE, content_type);
    if let Some(auth) = authorization {
        request = request.header(AUTHORIZATION, auth);
    }
    send(request.body(Full::new(Bytes::from(body))).expect("request")).await
}

fn encode_form(form: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form)
        .finish()
}

async fn post_form(url: &str, form: &[(&str, &str)]) -> Answer {
    post_raw(
        url,
        "application/x-www-form-urlencoded",
        encode_form(form),
        None,
    )
    .await
}

fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

/// The claims of a JWT, unverified.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("three parts");
    serde_json::from_slice(&super::jose::b64url_decode(payload).expect("base64url")).expect("JSON")
}

fn header_of(token: &str) -> Value {
    let header = token.split('.').next().expect("three parts");
    serde_json::from_slice(&super::jose::b64url_decode(header).expect("base64url")).expect("JSON")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64
}

async fn idp() -> DevIdp {
    let idp = DevIdp::start().await.expect("start IdP");
    idp.register_client(Client::secret(API, SECRET));
    idp
}

/// A user's token for oboe, as a caller would send it.
fn caller_token(idp: &DevIdp) -> String {
    idp.mint(&Mint::user(API))
}

fn obo_form<'a>(assertion: &'a str, scope: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", JWT_BEARER_GRANT),
        ("client_id", API),
        ("client_secret", SECRET),
        ("assertion", assertion),
        ("scope", scope),
        ("requested_token_use", "on_behalf_of"),
    ]
}

async fn obo(idp: &DevIdp, assertion: &str, scope: &str) -> Answer {
    post_form(&idp.token_url(DEV_TENANT), &obo_form(assertion, scope)).await
}

/// A compact JWS signed by a test-held RSA key.
fn sign_rsa(pair: &RsaKeyPair, alg: Algorithm, header: Value, claims: &Value) -> String {
    let mut header = header;
    header["alg"] = json!(alg);
    let input = format!(
        "{}.{}",
        b64url(header.to_string()),
        b64url(claims.to_string())
    );
    let encoding: &'static dyn sig::RsaEncoding = match alg {
        Algorithm::PS256 => &sig::RSA_PSS_SHA256,
        _ => &sig::RSA_PKCS1_SHA256,
    };
    let mut signature = vec![0; pair.public_modulus_len()];
    pair.sign(
        encoding,
        &aws_lc_rs::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .expect("sign");
    format!("{input}.{}", b64url(signature))
}

fn sign_ec(pair: &EcdsaKeyPair, header: Value, claims: &Value) -> String {
    let mut header = header;
    header["alg"] = json!("ES256");
    let input = format!(
        "{}.{}",
        b64url(header.to_string()),
        b64url(claims.to_string())
    );
    let signature = pair
        .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
        .expect("sign");
    format!("{input}.{}", b64url(signature))
}

/// A self-signed RSA certificate and its key.
fn rsa_certificate() -> (Vec<u8>, RsaKeyPair) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("RSA key");
    let cert = rcgen::CertificateParams::new(vec!["oboe.test".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let pair = RsaKeyPair::from_pkcs8(&key.serialize_der()).expect("PKCS#8");
    (cert.der().to_vec(), pair)
}

fn x5t_s256(cert_der: &[u8]) -> String {
    b64url(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        cert_der,
    ))
}

/// RFC 7523 claims of a client assertion for `aud`.
fn assertion_claims(client_id: &str, aud: &str) -> Value {
    let now = now();
    json!({
        "aud": aud,
        "iss": client_id,
        "sub": client_id,
        "jti": guid(),
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    })
}

async fn obo_with_assertion(idp: &DevIdp, client_id: &str, assertion: &str) -> Answer {
    let user = idp.mint(&Mint::user(client_id));
    post_form(
        &idp.token_url(DEV_TENANT),
        &[
            ("grant_type", JWT_BEARER_GRANT),
            ("client_id", client_id),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE),
            ("client_assertion", assertion),
            ("assertion", &user),
            ("scope", GRAPH_READ),
            ("requested_token_use", "on_behalf_of"),
        ],
    )
    .await
}

// ---------------------------------------------------------------- discovery

#[tokio::test]
async fn entra_v2_discovery_names_the_tenant_issuer_and_its_endpoints() {
    let idp = idp().await;
    let base = idp.base_url();
    let answer = get(&format!(
        "{base}/{DEV_TENANT}/v2.0/.well-known/openid-configuration"
    ))
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(
        answer
            .header(CACHE_CONTROL)
            .unwrap_or_default()
            .contains("max-age=86400")
    );
    let doc = answer.json();
    assert_eq!(doc["issuer"], json!(format!("{base}/{DEV_TENANT}/v2.0")));
    assert_eq!(doc["issuer"], json!(idp.entra_issuer(DEV_TENANT)));
    assert_eq!(doc["jwks_uri"], json!(idp.jwks_url(DEV_TENANT)));
    assert_eq!(doc["token_endpoint"], json!(idp.token_url(DEV_TENANT)));
    assert!(
        doc["id_token_signing_alg_values_supported"]
            .as_array()
            .is_some_and(|a| a.contains(&json!("RS256")))
    );
    assert_eq!(idp.counters().discovery, 1);
}

#[tokio::test]
async fn multi_tenant_discovery_names_the_tenantid_template() {
    let idp = idp().await;
    let base = idp.base_url();
    for tenant in ["organizations", "common"] {
        let v2 = get(&format!(
            "{base}/{tenant}/v2.0/.well-known/openid-configuration"
        ))
        .await
        .json();
        assert_eq!(v2["issuer"], json!(format!("{base}/{{tenantid}}/v2.0")));
        assert_eq!(
            v2["jwks_uri"],
            json!(format!("{base}/{tenant}/discovery/v2.0/keys"))
        );
        assert_eq!(
            v2["token_endpoint"],
            json!(format!("{base}/{tenant}/oauth2/v2.0/token"))
        );
        let v1 = get(&format!("{base}/{tenant}/.well-known/openid-configuration"))
            .await
            .json();
        assert_eq!(v1["issuer"], json!(format!("{base}/{{tenantid}}/")));
    }
}

#[tokio::test]
async fn entra_v1_discovery_names_the_v1_issuer_and_serves_its_keys() {
    let idp = idp().await;
    let base = idp.base_url();
    let doc = get(&format!(
        "{base}/{SECOND_TENANT}/.well-known/openid-configuration"
    ))
    .await
    .json();
    assert_eq!(doc["issuer"], json!(idp.entra_v1_issuer(SECOND_TENANT)));
    assert_eq!(doc["issuer"], json!(format!("{base}/{SECOND_TENANT}/")));
    let jwks_uri = doc["jwks_uri"].as_str().expect("jwks_uri");
    let keys = get(jwks_uri).await;
    assert_eq!(keys.status, StatusCode::OK);
    assert_eq!(keys.json()["keys"].as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn oidc_metadata_is_served_at_both_well_known_paths() {
    let idp = idp().await;
    let base = idp.base_url();
    for path in [
        "/oidc/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server/oidc",
    ] {
        let doc = get(&format!("{base}{path}")).await.json();
        assert_eq!(doc["issuer"], json!(idp.oidc_issuer()));
        assert_eq!(doc["jwks_uri"], json!(format!("{base}/oidc/keys")));
        assert_eq!(doc["token_endpoint"], json!(idp.oidc_token_url()));
    }
    let k8s = get(&format!("{base}/k8s/.well-known/openid-configuration"))
        .await
        .json();
    assert_eq!(k8s["issuer"], json!(idp.k8s_issuer()));
    assert_eq!(idp.counters().discovery, 3);
}

#[tokio::test]
async fn unknown_tenant_gets_aadsts90002() {
    let idp = idp().await;
    let tenant = "00000000-0000-4000-8000-00000000dead";
    let answer = get(&format!(
        "{}/{tenant}/v2.0/.well-known/openid-configuration",
        idp.base_url()
    ))
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.error(), "invalid_tenant");
    assert_eq!(answer.code(), 90002);
    idp.add_tenant(tenant);
    let answer = get(&format!(
        "{}/{tenant}/v2.0/.well-known/openid-configuration",
        idp.base_url()
    ))
    .await;
    assert_eq!(answer.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_paths_are_404_and_wrong_methods_refused() {
    let idp = idp().await;
    let base = idp.base_url();
    assert_eq!(
        get(&format!("{base}/nothing/here")).await.status,
        StatusCode::NOT_FOUND
    );
    let answer = get(&idp.token_url(DEV_TENANT)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    assert_eq!(answer.code(), 900561);
    let answer = post_form(&format!("{base}/oidc/keys"), &[]).await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
}

// ---------------------------------------------------------------- keys

#[tokio::test]
async fn keys_are_published_the_way_entra_publishes_them() {
    let idp = idp().await;
    let base = idp.base_url();
    for tenant in [DEV_TENANT, "common", "organizations"] {
        let answer = get(&format!("{base}/{tenant}/discovery/v2.0/keys")).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(
            answer
                .header(CACHE_CONTROL)
                .unwrap_or_default()
                .contains("max-age=86400")
        );
        let jwks = answer.json();
        let keys = jwks["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 2);
        let rsa = keys.iter().find(|k| k["kty"] == "RSA").expect("RSA key");
        assert_eq!(rsa["use"], "sig");
        assert!(rsa.get("alg").is_none(), "Entra's RSA keys carry no alg");
        assert_eq!(rsa["e"], "AQAB");
        assert_eq!(
            super::jose::b64url_decode(rsa["n"].as_str().expect("n")).map(|n| n.len()),
            Some(256)
        );
        assert_eq!(rsa["issuer"], json!(format!("{base}/{{tenantid}}/v2.0")));
        assert_eq!(rsa["kid"], json!(idp.current_kid(Algorithm::RS256)));
        let ec = keys.iter().find(|k| k["kty"] == "EC").expect("EC key");
        assert_eq!(ec["crv"], "P-256");
        assert_eq!(ec["alg"], "ES256");
        assert_eq!(ec["use"], "sig");
        assert_eq!(ec["issuer"], json!(format!("{base}/{{tenantid}}/v2.0")));
        assert!(ec["x"].is_string() && ec["y"].is_string());
    }
    let oidc = get(&format!("{base}/oidc/keys")).await.json();
    assert!(
        oidc["keys"]
            .as_array()
            .is_some_and(|k| k.iter().all(|k| k.get("issuer").is_none()))
    );
    assert_eq!(idp.counters().keys, 4);
}

async fn verify_with_jwks(
    idp: &DevIdp,
    jwks_url: &str,
    token: &str,
    alg: Algorithm,
    iss: &str,
    aud: &str,
) -> Value {
    let jwks: JwkSet = serde_json::from_str(&get(jwks_url).await.body).expect("JWKS parses");
    let kid = header_of(token)["kid"].as_str().expect("kid").to_owned();
    let jwk = jwks.find(&kid).expect("kid is published");
    let key = DecodingKey::from_jwk(jwk).expect("usable JWK");
    let mut validation = Validation::new(alg);
    validation.set_audience(&[aud]);
    validation.set_issuer(&[iss]);
    validation.validate_nbf = true;
    let _ = idp;
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .expect("token verifies")
        .claims
}

#[tokio::test]
async fn minted_tokens_verify_against_the_published_keys() {
    let idp = idp().await;
    for alg in [Algorithm::RS256, Algorithm::PS256, Algorithm::ES256] {
        let token = idp.mint(&Mint::user(API).alg(alg));
        assert_eq!(header_of(&token)["typ"], "JWT");
        assert_eq!(header_of(&token)["alg"], json!(alg));
        let claims = verify_with_jwks(
            &idp,
            &idp.jwks_url(DEV_TENANT),
            &token,
            alg,
            &idp.entra_issuer(DEV_TENANT),
            API,
        )
        .await;
        assert_eq!(claims["tid"], DEV_TENANT);
        assert_eq!(claims["oid"], DEV_USER_OID);
        assert_eq!(claims["sub"], DEV_USER_SUB);
        assert_eq!(claims["azp"], DEV_CLIENT_APP);
        assert_eq!(claims["scp"], "access_as_user");
        assert_eq!(claims["ver"], "2.0");
        assert_eq!(claims["idtyp"], "user");
        assert!(claims["uti"].is_string());
        let (iat, nbf, exp) = (
            claims["iat"].as_i64(),
            claims["nbf"].as_i64(),
            claims["exp"].as_i64(),
        );
        assert_eq!(nbf, iat);
        assert_eq!(exp, iat.map(|i| i + 3600));
    }
    // v1: the v1 issuer, appid instead of azp.
    let v1 = idp.mint(
        &Mint::user(format!("api://{API}"))
            .version(Version::V1)
            .tenant(SECOND_TENANT),
    );
    let claims = verify_with_jwks(
        &idp,
        &idp.jwks_url(SECOND_TENANT),
        &v1,
        Algorithm::RS256,
        &idp.entra_v1_issuer(SECOND_TENANT),
        &format!("api://{API}"),
    )
    .await;
    assert_eq!(claims["ver"], "1.0");
    assert_eq!(claims["appid"], DEV_CLIENT_APP);
    assert!(claims.get("azp").is_none());
    assert_eq!(claims["tid"], SECOND_TENANT);
    // App-only: roles, idtyp app, no scp.
    let app = idp.mint(&Mint::app(API).roles(["Data.Read"]));
    let claims = verify_with_jwks(
        &idp,
        &idp.jwks_url(DEV_TENANT),
        &app,
        Algorithm::RS256,
        &idp.entra_issuer(DEV_TENANT),
        API,
    )
    .await;
    assert_eq!(claims["roles"], json!(["Data.Read"]));
    assert_eq!(claims["idtyp"], "app");
    assert_eq!(claims["oid"], DEV_APP_OID);
    assert!(claims.get("scp").is_none());
    // Generic OIDC: RFC 9068.
    let oidc = idp.mint(
        &Mint::user("my-api")
            .version(Version::Oidc)
            .scopes(["read", "write"]),
    );
    assert_eq!(header_of(&oidc)["typ"], "at+jwt");
    let jwks_url = format!("{}/oidc/keys", idp.base_url());
    let claims = verify_with_jwks(
        &idp,
        &jwks_url,
        &oidc,
        Algorithm::RS256,
        &idp.oidc_issuer(),
        "my-api",
    )
    .await;
    assert_eq!(claims["scope"], "read write");
    assert_eq!(claims["client_id"], DEV_CLIENT_APP);
    assert!(claims["jti"].is_string());
    assert!(claims.get("tid").is_none());
}

#[tokio::test]
async fn mint_applies_extra_claims_last_and_offsets_nbf() {
    let idp = idp().await;
    let mut spec = Mint::user(API)
        .claim("iss", "https://evil.example")
        .claim("acrs", json!(["c1"]));
    spec.not_before_offset = 120;
    spec.lifetime = Duration::from_secs(60);
    let claims = claims_of(&idp.mint(&spec));
    assert_eq!(claims["iss"], "https://evil.example");
    assert_eq!(claims["acrs"], json!(["c1"]));
    let iat = claims["iat"].as_i64().expect("iat");
    assert_eq!(claims["nbf"].as_i64(), Some(iat + 120));
    assert_eq!(claims["exp"].as_i64(), Some(iat + 60));
}

#[tokio::test]
async fn rotation_replaces_the_keys_or_keeps_the_old_ones() {
    let idp = idp().await;
    let url = idp.jwks_url(DEV_TENANT);
    let kids = |jwks: Value| -> Vec<String> {
        jwks["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .map(|k| k["kid"].as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let first = kids(get(&url).await.json());
    let old_token = caller_token(&idp);
    idp.rotate_keys(true);
    let both = kids(get(&url).await.json());
    assert_eq!(both.len(), 4);
    assert!(first.iter().all(|k| both.contains(k)));
    let new_kid = idp.current_kid(Algorithm::RS256).expect("kid");
    assert!(!first.contains(&new_kid));
    assert_eq!(header_of(&caller_token(&idp))["kid"], json!(new_kid));
    // Old tokens still pass while the old key is published.
    assert_eq!(
        obo(&idp, &old_token, GRAPH_READ).await.status,
        StatusCode::OK
    );
    idp.rotate_keys(false);
    let last = kids(get(&url).await.json());
    assert_eq!(last.len(), 2);
    assert!(last.iter().all(|k| !both.contains(k)));
    let answer = obo(&idp, &old_token, GRAPH_READ).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::BAD_REQUEST, 50013)
    );
}

#[tokio::test]
async fn sign_raw_sets_alg_and_the_current_kid_unless_the_header_has_one() {
    let idp = idp().await;
    let token = idp.sign_raw(
        Algorithm::PS256,
        json!({ "typ": "JWT", "crit": ["exp"] }),
        json!({ "a": 1 }),
    );
    let header = header_of(&token);
    assert_eq!(header["alg"], "PS256");
    assert_eq!(header["kid"], json!(idp.current_kid(Algorithm::PS256)));
    assert_eq!(header["crit"], json!(["exp"]));
    assert_eq!(claims_of(&token), json!({ "a": 1 }));
    let token = idp.sign_raw(Algorithm::ES256, json!({ "kid": "mine" }), json!({}));
    assert_eq!(header_of(&token)["kid"], "mine");
    // HS256 keyed with the public key: the algorithm-confusion attack.
    let token = idp.sign_raw(Algorithm::HS256, json!({}), json!({}));
    assert_eq!(header_of(&token)["alg"], "HS256");
    assert_eq!(token.split('.').count(), 3);
}

// ---------------------------------------------------------------- OBO

#[tokio::test]
async fn obo_with_a_secret_in_the_body_issues_a_downstream_user_token() {
    let idp = idp().await;
    let caller = caller_token(&idp);
    let answer = obo(
        &idp,
        &caller,
        &format!("{GRAPH_READ} https://graph.microsoft.com/Mail.Read"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(answer.header(CACHE_CONTROL), Some("no-store"));
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["ext_expires_in"], 3600);
    assert_eq!(
        body["scope"],
        "https://graph.microsoft.com/User.Read https://graph.microsoft.com/Mail.Read"
    );
    assert!(body.get("refresh_token").is_none());
    let token = body["access_token"].as_str().expect("access_token");
    let claims = verify_with_jwks(
        &idp,
        &idp.jwks_url(DEV_TENANT),
        token,
        Algorithm::RS256,
        &idp.entra_issuer(DEV_TENANT),
        "https://graph.microsoft.com",
    )
    .await;
    assert_eq!(claims["scp"], "User.Read Mail.Read");
    assert_eq!(claims["oid"], DEV_USER_OID);
    assert_eq!(claims["sub"], DEV_USER_SUB);
    assert_eq!(claims["tid"], DEV_TENANT);
    assert_eq!(claims["azp"], API);
    assert_eq!(claims["azpacr"], "1");
    assert_eq!(claims["idtyp"], "user");
    assert_eq!(claims["ver"], "2.0");
    let sent = idp.token_request_log();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].get("requested_token_use"), Some("on_behalf_of"));
    assert_eq!(sent[0].get("client_secret"), Some(SECRET));
    assert_eq!(sent[0].path, format!("/{DEV_TENANT}/oauth2/v2.0/token"));
    assert!(sent[0].authorization.is_none());
}

#[tokio::test]
async fn obo_scopes_follow_entra_rules() {
    let idp = idp().await;
    let caller = caller_token(&idp);
    // `.default` expands to the consented scopes (or `default`).
    let answer = obo(&idp, &caller, "api://downstream/.default").await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let claims = claims_of(answer.json()["access_token"].as_str().expect("token"));
    assert_eq!(claims["aud"], "api://downstream");
    assert_eq!(claims["scp"], "default");
    idp.set_consented_scopes("api://downstream", ["access_as_user", "Files.Read"]);
    let answer = obo(&idp, &caller, "api://downstream/.default").await;
    let claims = claims_of(answer.json()["access_token"].as_str().expect("token"));
    assert_eq!(claims["scp"], "access_as_user Files.Read");
    // A bare scope is Microsoft Graph's; offline_access adds a refresh token.
    let answer = obo(&idp, &caller, "User.Read offline_access").await;
    let body = answer.json();
    assert_eq!(
        claims_of(body["access_token"].as_str().expect("token"))["aud"],
        "https://graph.microsoft.com"
    );
    assert!(body["refresh_token"].is_string());
    // One resource per request; `.default` alone.
    let answer = obo(&idp, &caller, "api://a/x api://b/y").await;
    assert_eq!(
        (answer.status, answer.error().as_str(), answer.code()),
        (StatusCode::BAD_REQUEST, "invalid_scope", 700022)
    );
    let answer = obo(&idp, &caller, "api://a/.default api://a/x").await;
    assert_eq!(
        (answer.error().as_str(), answer.code()),
        ("invalid_scope", 70011)
    );
    let answer = obo(&idp, &caller, "openid").await;
    assert_eq!(
        (answer.error().as_str(), answer.code()),
        ("invalid_scope", 70011)
    );
}

#[tokio::test]
async fn basic_credentials_are_form_urlencoded_then_base64_per_rfc6749() {
    let idp = idp().await;
    let caller = caller_token(&idp);
    let form = encode_form(&[
        ("grant_type", JWT_BEARER_GRANT),
        ("assertion", &caller),
        ("scope", GRAPH_READ),
        ("requested_token_use", "on_behalf_of"),
    ]);
    let url = idp.token_url(DEV_TENANT);
    let answer = post_raw(
        &url,
        "application/x-www-form-urlencoded",
        form.clone(),
        Some(&basic(API, SECRET)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert!(idp.token_requests()[0].contains(&("authorization".to_owned(), basic(API, SECRET))));
    // The raw secret, not form-urlencoded first, is wrong.
    let raw = format!("Basic {}", STANDARD.encode(format!("{API}:{SECRET}")));
    let answer = post_raw(&url, "application/x-www-form-urlencoded", form, Some(&raw)).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::UNAUTHORIZED, 7000215)
    );
    assert!(
        answer
            .header(WWW_AUTHENTICATE)
            .is_some_and(|v| v.starts_with("Basic"))
    );
}

#[tokio::test]
async fn client_secrets_are_checked() {
    let idp = idp().await;
    let caller = caller_token(&idp);
    let url = idp.token_url(DEV_TENANT);
    let with = |id: &'static str, secret: Option<&'static str>| {
        let mut form = obo_form(&caller, GRAPH_READ);
        form.retain(|(k, _)| *k != "client_secret" && *k != "client_id");
        form.push(("client_id", id));
        if let Some(secret) = secret {
            form.push(("client_secret", secret));
        }
        form
    };
    let cases = [
        (
            with(API, Some("wrong")),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
        ),
        (
            with("99999999-0000-4000-8000-000000000000", Some(SECRET)),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            700016,
        ),
        (
            with(API, None),
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000218,
        ),
    ];
    for (form, status, error, code) in cases {
        let answer = post_form(&url, &form).await;
        assert_eq!(
            (answer.status, answer.error().as_str(), answer.code()),
            (status, error, code),
            "{}",
            answer.body
        );
        let body = answer.json();
        assert!(
            body["error_description"]
                .as_str()
                .is_some_and(|d| d.starts_with(&format!("AADSTS{code}: ")))
        );
        for field in ["timestamp", "trace_id", "correlation_id"] {
            assert!(body[field].is_string(), "{field}");
        }
    }
    // Two authentication methods at once are refused (RFC 6749 §2.3).
    let form = encode_form(&obo_form(&caller, GRAPH_READ));
    let answer = post_raw(
        &url,
        "application/x-www-form-urlencoded",
        form,
        Some(&basic(API, SECRET)),
    )
    .await;
    assert_eq!(
        (answer.status, answer.error().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
}

#[tokio::test]
async fn certificate_assertions_are_accepted_with_ps256_and_rs256() {
    let idp = idp().await;
    let (cert, key) = rsa_certificate();
    let client = "cert-client";
    idp.register_client(Client::certificate(client, cert.clone()));
    for alg in [Algorithm::PS256, Algorithm::RS256] {
        let assertion = sign_rsa(
            &key,
            alg,
            json!({ "typ": "JWT", "x5t#S256": x5t_s256(&cert) }),
            &assertion_claims(client, &idp.token_url(DEV_TENANT)),
        );
        let answer = obo_with_assertion(&idp, client, &assertion).await;
        assert_eq!(answer.status, StatusCode::OK, "{alg:?}: {}", answer.body);
        assert_eq!(
            claims_of(answer.json()["access_token"].as_str().expect("token"))["azpacr"],
            "2"
        );
    }
}

#[tokio::test]
async fn certificate_assertions_are_checked_like_entra_does() {
    let idp = idp().await;
    let (cert, key) = rsa_certificate();
    let (_, other_key) = rsa_certificate();
    let client = "cert-client";
    idp.register_client(Client::certificate(client, cert.clone()));
    let url = idp.token_url(DEV_TENANT);
    let header = json!({ "typ": "JWT", "x5t#S256": x5t_s256(&cert) });
    let good = assertion_claims(client, &url);
    let with = |name: &str, value: Value| {
        let mut claims = good.clone();
        claims[name] = value;
        claims["jti"] = json!(guid());
        claims
    };
    let t = now();
    let cases: Vec<(&str, String, u64)> = vec![
        (
            "signed by another key",
            sign_rsa(&other_key, Algorithm::PS256, header.clone(), &good),
            700027,
        ),
        (
            "x5t#S256 of another certificate",
            sign_rsa(
                &key,
                Algorithm::PS256,
                json!({ "x5t#S256": x5t_s256(b"other") }),
                &good,
            ),
            700027,
        ),
        (
            "no x5t#S256",
            sign_rsa(&key, Algorithm::PS256, json!({ "typ": "JWT" }), &good),
            700027,
        ),
        (
            "audience of another tenant",
            sign_rsa(
                &key,
                Algorithm::PS256,
                header.clone(),
                &with("aud", json!(idp.token_url(SECOND_TENANT))),
            ),
            50027,
        ),
        (
            "expired",
            sign_rsa(
                &key,
                Algorithm::PS256,
                header.clone(),
                &with("exp", json!(t - 1)),
            ),
            700024,
        ),
        (
            "not yet valid",
            sign_rsa(&key, Algorithm::PS256, header.clone(), &{
                let mut c = with("nbf", json!(t + 60));
                c["exp"] = json!(t + 300);
                c
            }),
            700024,
        ),
        (
            "lives longer than 10 minutes",
            sign_rsa(
                &key,
                Algorithm::PS256,
                header.clone(),
                &with("exp", json!(t + 601)),
            ),
            700024,
        ),
        (
            "iss is another client",
            sign_rsa(&key, Algorithm::PS256, header.clone(), &{
                let mut c = with("iss", json!("other"));
                c["sub"] = json!("other");
                c
            }),
            700021,
        ),
        (
            "iss differs from sub",
            sign_rsa(
                &key,
                Algorithm::PS256,
                header.clone(),
                &with("sub", json!("other")),
            ),
            50048,
        ),
        (
            "no jti",
            sign_rsa(&key, Algorithm::PS256, header.clone(), &{
                let mut c = good.clone();
                c.as_object_mut().map(|m| m.remove("jti"));
                c
            }),
            90014,
        ),
        ("not a JWT", "not-a-jwt".to_owned(), 50027),
    ];
    for (why, assertion, code) in cases {
        let answer = obo_with_assertion(&idp, client, &assertion).await;
        assert_eq!(
            (answer.status, answer.error().as_str(), answer.code()),
            (StatusCode::UNAUTHORIZED, "invalid_client", code),
            "{why}: {}",
            answer.body
        );
    }
    // A jti is good once.
    let once = sign_rsa(
        &key,
        Algorithm::PS256,
        header.clone(),
        &with("jti", json!(guid())),
    );
    assert_eq!(
        obo_with_assertion(&idp, client, &once).await.status,
        StatusCode::OK
    );
    let replay = obo_with_assertion(&idp, client, &once).await;
    assert_eq!(
        (replay.status, replay.code()),
        (StatusCode::UNAUTHORIZED, 50027)
    );
}

#[tokio::test]
async fn federated_tokens_are_accepted_for_their_subject_only() {
    let idp = idp().await;
    let subject = "system:serviceaccount:shop:oboe";
    idp.register_client(Client::federated("fed-client", subject));
    let token = idp.mint_federated(subject, Duration::from_secs(3600));
    let claims = claims_of(&token);
    assert_eq!(claims["iss"], json!(idp.k8s_issuer()));
    assert_eq!(claims["aud"], json!([FEDERATED_TOKEN_AUDIENCE]));
    assert_eq!(claims["sub"], subject);
    let answer = obo_with_assertion(&idp, "fed-client", &token).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    // Reusable until it expires (the kubelet rotates it).
    assert_eq!(
        obo_with_assertion(&idp, "fed-client", &token).await.status,
        StatusCode::OK
    );

    let other = DevIdp::start().await.expect("another IdP");
    let cases = [
        (
            "another subject",
            idp.mint_federated("system:serviceaccount:shop:other", Duration::from_secs(600)),
            700213,
        ),
        (
            "expired",
            idp.mint_federated(subject, Duration::ZERO),
            700024,
        ),
        (
            "another issuer",
            other.mint_federated(subject, Duration::from_secs(600)),
            700211,
        ),
        (
            "forged with the right issuer",
            other.sign_raw(Algorithm::RS256, json!({}), claims.clone()),
            700027,
        ),
    ];
    for (why, token, code) in cases {
        let answer = obo_with_assertion(&idp, "fed-client", &token).await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::UNAUTHORIZED, code),
            "{why}: {}",
            answer.body
        );
    }
}

#[tokio::test]
async fn private_key_jwt_is_checked_with_the_registered_jwk() {
    let idp = idp().await;
    let pair = EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
    let point = pair.public_key().as_ref().to_vec();
    let jwk = json!({ "kty": "EC", "crv": "P-256", "x": b64url(&point[1..33]), "y": b64url(&point[33..]), "kid": "k1" });
    idp.register_client(Client::private_key_jwt("pkj-client", jwk));
    let url = idp.oidc_token_url();
    let exchange = |assertion: String| {
        let subject = idp.mint(&Mint::user("pkj-client").version(Version::Oidc));
        let url = url.clone();
        async move {
            post_form(
                &url,
                &[
                    ("grant_type", TOKEN_EXCHANGE_GRANT),
                    ("client_id", "pkj-client"),
                    ("client_assertion_type", CLIENT_ASSERTION_TYPE),
                    ("client_assertion", &assertion),
                    ("subject_token", &subject),
                    ("subject_token_type", ACCESS_TOKEN_TYPE),
                ],
            )
            .await
        }
    };
    let good = sign_ec(
        &pair,
        json!({ "kid": "k1" }),
        &assertion_claims("pkj-client", &url),
    );
    let answer = exchange(good).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    // The issuer is an accepted audience too at the OIDC endpoint.
    let by_issuer = sign_ec(
        &pair,
        json!({}),
        &assertion_claims("pkj-client", &idp.oidc_issuer()),
    );
    assert_eq!(exchange(by_issuer).await.status, StatusCode::OK);
    let other = EcdsaKeyPair::generate(&sig::ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
    let forged = sign_ec(
        &other,
        json!({ "kid": "k1" }),
        &assertion_claims("pkj-client", &url),
    );
    let answer = exchange(forged).await;
    assert_eq!(
        (answer.status, answer.error().as_str()),
        (StatusCode::UNAUTHORIZED, "invalid_client")
    );
    assert!(
        answer.json().get("error_codes").is_none(),
        "OIDC errors are RFC 6749 shaped"
    );
    let wrong_kid = sign_ec(
        &pair,
        json!({ "kid": "k2" }),
        &assertion_claims("pkj-client", &url),
    );
    assert_eq!(exchange(wrong_kid).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn obo_needs_a_tenant() {
    let idp = idp().await;
    let caller = caller_token(&idp);
    for (tenant, code) in [("common", 9001023), ("organizations", 50059)] {
        let answer = post_form(&idp.token_url(tenant), &obo_form(&caller, GRAPH_READ)).await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::BAD_REQUEST, code),
            "{tenant}"
        );
    }
}

#[tokio::test]
async fn obo_refuses_app_only_assertions() {
    let idp = idp().await;
    let app = idp.mint(&Mint::app(API).roles(["Data.Read"]));
    let answer = obo(&idp, &app, GRAPH_READ).await;
    assert_eq!(
        (answer.status, answer.error().as_str(), answer.code()),
        (StatusCode::BAD_REQUEST, "unauthorized_client", 7000114)
    );
}

#[tokio::test]
async fn obo_assertions_are_checked() {
    let idp = idp().await;
    let other = DevIdp::start().await.expect("another IdP");
    let mut expired = Mint::user(API);
    expired.not_before_offset = -7200;
    expired.extra.insert("exp".into(), json!(now() - 60));
    let cases = [
        (
            "v1 audience api://{client}",
            idp.mint(&Mint::user(format!("api://{API}")).version(Version::V1)),
            StatusCode::OK,
            0,
        ),
        (
            "another audience",
            idp.mint(&Mint::user("api://someone-else")),
            StatusCode::BAD_REQUEST,
            500131,
        ),
        (
            "expired",
            idp.mint(&expired),
            StatusCode::BAD_REQUEST,
            500133,
        ),
        (
            "another tenant",
            idp.mint(&Mint::user(API).tenant(SECOND_TENANT)),
            StatusCode::BAD_REQUEST,
            50013,
        ),
        (
            "another IdP's",
            other.mint(&Mint::user(API)),
            StatusCode::BAD_REQUEST,
            50013,
        ),
        (
            "unsigned",
            idp.sign_raw(Algorithm::HS256, json!({}), claims_of(&caller_token(&idp))),
            StatusCode::BAD_REQUEST,
            50013,
        ),
        (
            "malformed",
            "a.b".to_owned(),
            StatusCode::BAD_REQUEST,
            50027,
        ),
    ];
    for (why, assertion, status, code) in cases {
        let answer = obo(&idp, &assertion, GRAPH_READ).await;
        assert_eq!(answer.status, status, "{why}: {}", answer.body);
        if status != StatusCode::OK {
            assert_eq!(
                (answer.error().as_str(), answer.code()),
                ("invalid_grant", code),
                "{why}"
            );
        }
    }
    let mut form = obo_form("x", GRAPH_READ);
    form.retain(|(k, _)| *k != "requested_token_use");
    let answer = post_form(&idp.token_url(DEV_TENANT), &form).await;
    assert_eq!(
        (answer.error().as_str(), answer.code()),
        ("invalid_request", 900144)
    );
}

#[tokio::test]
async fn multi_tenant_obo_goes_to_the_callers_tenant() {
    let idp = idp().await;
    let caller = idp.mint(&Mint::user(API).tenant(SECOND_TENANT));
    let answer = post_form(
        &idp.token_url(SECOND_TENANT),
        &obo_form(&caller, GRAPH_READ),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let claims = claims_of(answer.json()["access_token"].as_str().expect("token"));
    assert_eq!(claims["tid"], SECOND_TENANT);
    assert_eq!(claims["iss"], json!(idp.entra_issuer(SECOND_TENANT)));
}

// ---------------------------------------------------------------- token exchange, client credentials

#[tokio::test]
async fn entra_refuses_token_exchange_and_oidc_refuses_jwt_bearer() {
    let idp = idp().await;
    let caller = caller_token(&idp);
    let form = [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("client_id", API),
        ("client_secret", SECRET),
        ("subject_token", caller.as_str()),
        ("subject_token_type", ACCESS_TOKEN_TYPE),
    ];
    let answer = post_form(&idp.token_url(DEV_TENANT), &form).await;
    assert_eq!(
        (answer.status, answer.error().as_str(), answer.code()),
        (StatusCode::BAD_REQUEST, "unsupported_grant_type", 70003)
    );
    let answer = post_form(&idp.oidc_token_url(), &obo_form(&caller, GRAPH_READ)).await;
    assert_eq!(
        (answer.status, answer.error().as_str()),
        (StatusCode::BAD_REQUEST, "unsupported_grant_type")
    );
}

#[tokio::test]
async fn token_exchange_issues_a_token_for_the_requested_audiences() {
    let idp = idp().await;
    let subject = idp.mint(&Mint::user(API).version(Version::Oidc));
    let form = [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("subject_token", subject.as_str()),
        ("subject_token_type", ACCESS_TOKEN_TYPE),
        ("audience", "orders"),
        ("audience", "billing"),
        ("scope", "orders.read"),
        ("requested_token_type", ACCESS_TOKEN_TYPE),
    ];
    let answer = post_raw(
        &idp.oidc_token_url(),
        "application/x-www-form-urlencoded; charset=utf-8",
        encode_form(&form),
        Some(&basic(API, SECRET)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["issued_token_type"], ACCESS_TOKEN_TYPE);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "orders.read");
    let token = body["access_token"].as_str().expect("token");
    let claims = verify_with_jwks(
        &idp,
        &format!("{}/oidc/keys", idp.base_url()),
        token,
        Algorithm::RS256,
        &idp.oidc_issuer(),
        "orders",
    )
    .await;
    assert_eq!(claims["aud"], json!(["orders", "billing"]));
    assert_eq!(claims["sub"], DEV_USER_SUB);
    assert_eq!(claims["client_id"], API);
    assert_eq!(claims["scope"], "orders.read");
    // `resource` when there is no `audience`.
    let form = [
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("client_id", API),
        ("client_secret", SECRET),
        ("subject_token", subject.as_str()),
        ("subject_token_type", ACCESS_TOKEN_TYPE),
        ("resource", "https://orders.example"),
    ];
    let answer = post_form(&idp.oidc_token_url(), &form).await;
    assert_eq!(
        claims_of(answer.json()["access_token"].as_str().expect("token"))["aud"],
        "https://orders.example"
    );
}

fn exchange_form<'a>(subject: &'a str, subject_type: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", TOKEN_EXCHANGE_GRANT),
        ("client_id", API),
        ("client_secret", SECRET),
        ("subject_token", subject),
        ("subject_token_type", subject_type),
    ]
}

#[tokio::test]
async fn token_exchange_checks_its_inputs() {
    let idp = idp().await;
    let good = idp.mint(&Mint::user(API).version(Version::Oidc));
    let entra = caller_token(&idp);
    let foreign_aud = idp.mint(&Mint::user("someone-else").version(Version::Oidc));
    let (good, entra, foreign_aud) = (good.as_str(), entra.as_str(), foreign_aud.as_str());
    let base = exchange_form;
    let cases = [
        (
            "id_token type",
            base(good, "urn:ietf:params:oauth:token-type:id_token"),
            "invalid_request",
        ),
        (
            "no subject_token",
            base("", ACCESS_TOKEN_TYPE),
            "invalid_request",
        ),
        (
            "Entra-issued subject",
            base(entra, ACCESS_TOKEN_TYPE),
            "invalid_grant",
        ),
        (
            "subject for another client",
            base(foreign_aud, ACCESS_TOKEN_TYPE),
            "invalid_grant",
        ),
        (
            "relative resource",
            {
                let mut f = base(good, ACCESS_TOKEN_TYPE);
                f.push(("resource", "orders"));
                f
            },
            "invalid_target",
        ),
        (
            "actor token",
            {
                let mut f = base(good, ACCESS_TOKEN_TYPE);
                f.push(("actor_token", good));
                f
            },
            "invalid_request",
        ),
    ];
    for (why, form, error) in cases {
        let answer = post_form(&idp.oidc_token_url(), &form).await;
        assert_eq!(
            (answer.status, answer.error().as_str()),
            (StatusCode::BAD_REQUEST, error),
            "{why}: {}",
            answer.body
        );
    }
}

#[tokio::test]
async fn entra_client_credentials_issue_an_app_token_with_roles() {
    let idp = idp().await;
    idp.register_client(Client::secret("daemon", "pw").with_roles(["Orders.ReadWrite.All"]));
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", "daemon"),
        ("client_secret", "pw"),
        ("scope", "api://orders/.default"),
    ];
    let answer = post_form(&idp.token_url(DEV_TENANT), &form).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["expires_in"], 3600);
    let claims = verify_with_jwks(
        &idp,
        &idp.jwks_url(DEV_TENANT),
        body["access_token"].as_str().expect("token"),
        Algorithm::RS256,
        &idp.entra_issuer(DEV_TENANT),
        "api://orders",
    )
    .await;
    assert_eq!(claims["roles"], json!(["Orders.ReadWrite.All"]));
    assert_eq!(claims["idtyp"], "app");
    assert_eq!(claims["azp"], "daemon");
    assert_eq!(claims["oid"], claims["sub"]);
    assert!(claims.get("scp").is_none());
    for (scope, code) in [
        ("api://orders/read", 1002012),
        ("api://a/.default api://b/.default", 70011),
    ] {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", "daemon"),
            ("client_secret", "pw"),
            ("scope", scope),
        ];
        let answer = post_form(&idp.token_url(DEV_TENANT), &form).await;
        assert_eq!(
            (answer.status, answer.error().as_str(), answer.code()),
            (StatusCode::BAD_REQUEST, "invalid_scope", code),
            "{scope}"
        );
    }
}

#[tokio::test]
async fn oidc_client_credentials_issue_an_rfc9068_token() {
    let idp = idp().await;
    let form = [
        ("grant_type", "client_credentials"),
        ("client_id", API),
        ("client_secret", SECRET),
        ("audience", "orders"),
        ("scope", "orders.read"),
    ];
    let answer = post_form(&idp.oidc_token_url(), &form).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let token = answer.json()["access_token"]
        .as_str()
        .expect("token")
        .to_owned();
    assert_eq!(header_of(&token)["typ"], "at+jwt");
    let claims = claims_of(&token);
    assert_eq!(
        (
            claims["aud"].as_str(),
            claims["sub"].as_str(),
            claims["scope"].as_str()
        ),
        (Some("orders"), Some(API), Some("orders.read"))
    );
}

#[tokio::test]
async fn token_requests_must_be_form_encoded_with_single_parameters() {
    let idp = idp().await;
    let answer = post_raw(
        &idp.token_url(DEV_TENANT),
        "application/json",
        json!({ "grant_type": "client_credentials" }).to_string(),
        None,
    )
    .await;
    assert_eq!(
        (answer.status, answer.error().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let answer = post_form(
        &idp.token_url(DEV_TENANT),
        &[
            ("grant_type", "client_credentials"),
            ("grant_type", "client_credentials"),
        ],
    )
    .await;
    assert_eq!(
        (answer.status, answer.error().as_str()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let answer = post_form(&idp.token_url(DEV_TENANT), &[("client_id", API)]).await;
    assert_eq!(
        (answer.error().as_str(), answer.code()),
        ("invalid_request", 900144)
    );
    let answer = post_form(&idp.token_url(DEV_TENANT), &[("grant_type", "password")]).await;
    assert_eq!(answer.error(), "unsupported_grant_type");
}

// ---------------------------------------------------------------- misbehaviour

#[tokio::test]
async fn claims_challenge_applies_to_that_user_only() {
    let idp = idp().await;
    let other_user = idp.mint(&Mint {
        oid: "0f0f0f0f-0000-4000-8000-000000000001".into(),
        ..Mint::user(API)
    });
    idp.update_behaviour(|b| b.claims_challenge = Some(ClaimsChallenge::for_user(DEV_USER_OID)));
    let answer = obo(&idp, &caller_token(&idp), GRAPH_READ).await;
    assert_eq!(
        (answer.status, answer.error().as_str(), answer.code()),
        (StatusCode::BAD_REQUEST, "interaction_required", 50076)
    );
    let body = answer.json();
    assert_eq!(body["claims"], DEFAULT_CHALLENGE_CLAIMS);
    let claims: Value =
        serde_json::from_str(body["claims"].as_str().expect("claims string")).expect("claims JSON");
    assert_eq!(claims["access_token"]["capolids"]["essential"], true);
    assert!(body["trace_id"].is_string() && body["correlation_id"].is_string());
    assert_eq!(
        obo(&idp, &other_user, GRAPH_READ).await.status,
        StatusCode::OK
    );
    idp.set_behaviour(Behaviour::default());
    assert_eq!(
        obo(&idp, &caller_token(&idp), GRAPH_READ).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn consent_missing_for_a_scope_is_aadsts65001() {
    let idp = idp().await;
    idp.update_behaviour(|b| {
        b.consent_missing = Some("https://graph.microsoft.com/Mail.Read".into())
    });
    let answer = obo(
        &idp,
        &caller_token(&idp),
        "https://graph.microsoft.com/Mail.Read",
    )
    .await;
    assert_eq!(
        (answer.status, answer.error().as_str(), answer.code()),
        (StatusCode::BAD_REQUEST, "invalid_grant", 65001)
    );
    assert_eq!(answer.json()["suberror"], "consent_required");
    assert_eq!(
        obo(&idp, &caller_token(&idp), GRAPH_READ).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn throttling_answers_429_with_retry_after() {
    let idp = idp().await;
    idp.update_behaviour(|b| b.throttle = Some(Duration::from_secs(7)));
    let answer = obo(&idp, &caller_token(&idp), GRAPH_READ).await;
    assert_eq!(answer.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(answer.header(RETRY_AFTER), Some("7"));
    idp.update_behaviour(|b| b.throttle = None);
    assert_eq!(
        obo(&idp, &caller_token(&idp), GRAPH_READ).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn server_errors_for_the_next_requests_then_normal_answers() {
    let idp = idp().await;
    idp.fail_next(StatusCode::SERVICE_UNAVAILABLE, 2);
    let caller = caller_token(&idp);
    for _ in 0..2 {
        let answer = obo(&idp, &caller, GRAPH_READ).await;
        assert_eq!(
            (answer.status, answer.error().as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable")
        );
    }
    assert_eq!(obo(&idp, &caller, GRAPH_READ).await.status, StatusCode::OK);
    assert!(idp.behaviour().fail_next.is_none());
    idp.fail_next(StatusCode::INTERNAL_SERVER_ERROR, 1);
    let answer = obo(&idp, &caller, GRAPH_READ).await;
    assert_eq!(
        (answer.status, answer.error().as_str()),
        (StatusCode::INTERNAL_SERVER_ERROR, "server_error")
    );
    assert_eq!(obo(&idp, &caller, GRAPH_READ).await.status, StatusCode::OK);
    assert_eq!(idp.counters().token, 5);
}

#[tokio::test]
async fn delays_slow_token_and_key_answers() {
    let idp = idp().await;
    let delay = Duration::from_millis(300);
    idp.update_behaviour(|b| b.token_delay = delay);
    let started = Instant::now();
    assert_eq!(
        obo(&idp, &caller_token(&idp), GRAPH_READ).await.status,
        StatusCode::OK
    );
    assert!(started.elapsed() >= delay);
    idp.update_behaviour(|b| {
        b.token_delay = Duration::ZERO;
        b.keys_delay = delay;
    });
    let started = Instant::now();
    assert_eq!(get(&idp.jwks_url(DEV_TENANT)).await.status, StatusCode::OK);
    assert!(started.elapsed() >= delay);
}

#[tokio::test]
async fn malformed_answers_are_200s_oboe_cannot_use() {
    let idp = idp().await;
    idp.update_behaviour(|b| b.malformed = Some(Malformed::NotJson));
    let answer = obo(&idp, &caller_token(&idp), GRAPH_READ).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(serde_json::from_str::<Value>(&answer.body).is_err());
    idp.update_behaviour(|b| b.malformed = Some(Malformed::NoAccessToken));
    let answer = obo(&idp, &caller_token(&idp), GRAPH_READ).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.json().get("access_token").is_none());
}

#[tokio::test]
async fn keys_and_discovery_can_be_down() {
    let idp = idp().await;
    let discovery = format!(
        "{}/{DEV_TENANT}/v2.0/.well-known/openid-configuration",
        idp.base_url()
    );
    idp.update_behaviour(|b| b.keys_down = true);
    assert_eq!(
        get(&idp.jwks_url(DEV_TENANT)).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&discovery).await.status, StatusCode::OK);
    idp.update_behaviour(|b| {
        b.keys_down = false;
        b.discovery_down = true;
    });
    assert_eq!(
        get(&discovery).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(&idp.jwks_url(DEV_TENANT)).await.status, StatusCode::OK);
    assert_eq!(
        idp.counters(),
        Counters {
            discovery: 2,
            keys: 2,
            token: 0
        }
    );
}

#[tokio::test]
async fn counters_are_served_as_json_for_callers_in_another_process() {
    let idp = idp().await;
    assert_eq!(get(&idp.jwks_url(DEV_TENANT)).await.status, StatusCode::OK);
    assert_eq!(
        obo(&idp, &caller_token(&idp), GRAPH_READ).await.status,
        StatusCode::OK
    );
    let answer = get(&format!("{}/.dev/counters", idp.base_url())).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(
        answer.json(),
        json!({ "discovery": 0, "keys": 1, "token": 1 })
    );
    // Reading the counters is not counted.
    assert_eq!(idp.counters().keys + idp.counters().token, 2);
}

#[tokio::test]
async fn token_lifetime_sets_expires_in_and_exp() {
    let idp = idp().await;
    idp.update_behaviour(|b| b.token_lifetime = Duration::from_secs(90));
    let body = obo(&idp, &caller_token(&idp), GRAPH_READ).await.json();
    assert_eq!(body["expires_in"], 90);
    let claims = claims_of(body["access_token"].as_str().expect("token"));
    assert_eq!(
        claims["exp"].as_i64(),
        claims["iat"].as_i64().map(|i| i + 90)
    );
}

#[tokio::test]
async fn the_clock_can_be_moved_to_expire_tokens() {
    let idp = idp().await;
    let caller = idp.mint(&Mint::user(API).lifetime(Duration::from_secs(60)));
    assert_eq!(obo(&idp, &caller, GRAPH_READ).await.status, StatusCode::OK);
    idp.advance_clock(61);
    let answer = obo(&idp, &caller, GRAPH_READ).await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::BAD_REQUEST, 500133)
    );
}

#[tokio::test]
async fn every_token_request_is_counted_and_recorded() {
    let idp = idp().await;
    let caller = caller_token(&idp);
    obo(&idp, &caller, GRAPH_READ).await;
    post_form(
        &idp.token_url(DEV_TENANT),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert_eq!(idp.counters().token, 2);
    let requests = idp.token_requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[0].contains(&("assertion".to_owned(), caller.clone())));
    assert!(requests[0].contains(&("requested_token_use".to_owned(), "on_behalf_of".to_owned())));
    assert_eq!(
        requests[1],
        vec![("grant_type".to_owned(), "client_credentials".to_owned())]
    );
    // Debug output never shows values.
    let debug = format!("{:?}", idp.token_request_log());
    assert!(!debug.contains(&caller) && !debug.contains(SECRET));
    assert!(!format!("{:?}", Client::secret("x", SECRET)).contains(SECRET));
}

#[tokio::test]
async fn the_server_stops_when_the_last_handle_is_dropped() {
    let idp = idp().await;
    let addr = idp.addr();
    assert!(addr.ip().is_loopback());
    let clone = idp.clone();
    drop(idp);
    assert_eq!(
        get(&clone.jwks_url(DEV_TENANT)).await.status,
        StatusCode::OK
    );
    drop(clone);
    tokio::task::yield_now().await;
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the listener is closed");
}

#[tokio::test]
async fn only_loopback_listeners_are_accepted() {
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let error = DevIdp::start_on(listener).expect_err("not loopback");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}

// ---------------------------------------------------------------- pure pieces

#[test]
fn certificates_yield_their_public_key() {
    let (cert, key) = rsa_certificate();
    let from_cert = super::jose::PublicKey::from_certificate(&cert).expect("RSA key");
    let from_key = super::jose::PublicKey::from_pkcs1(key.public_key().as_ref()).expect("PKCS#1");
    assert_eq!(from_cert, from_key);
    let ec_key = rcgen::KeyPair::generate().expect("P-256 key");
    let ec_cert = rcgen::CertificateParams::new(vec!["x".to_owned()])
        .expect("params")
        .self_signed(&ec_key)
        .expect("cert");
    assert!(matches!(
        super::jose::PublicKey::from_certificate(ec_cert.der()),
        Some(super::jose::PublicKey::P256 { .. })
    ));
    assert!(super::jose::PublicKey::from_certificate(b"\x30\x03\x02\x01\x00").is_none());
    assert!(super::jose::PublicKey::from_certificate(&cert[..cert.len() / 2]).is_none());
}

#[test]
fn tokens_with_crit_or_unknown_alg_do_not_parse() {
    let part = |v: Value| b64url(v.to_string());
    let crit = format!(
        "{}.{}.",
        part(json!({ "alg": "RS256", "crit": ["x"] })),
        part(json!({}))
    );
    assert!(super::jose::Jws::parse(&crit).is_err());
    let none = format!("{}.{}.", part(json!({ "alg": "none" })), part(json!({})));
    assert!(super::jose::Jws::parse(&none).is_err());
    assert!(super::jose::Jws::parse("a.b.c.d").is_err());
}

#[test]
fn guids_look_like_guids() {
    let g = guid();
    assert_eq!(g.len(), 36);
    assert_eq!(g.matches('-').count(), 4);
    assert_eq!(&g[14..15], "4");
    assert_ne!(g, guid());
}
