//! A small HTTP client for the data and admin APIs, answering (status, JSON body).

use std::time::Duration;

use serde_json::Value;

#[derive(Clone)]
pub struct DataClient {
    pub http: reqwest::Client,
}

impl Default for DataClient {
    fn default() -> Self {
        Self::new()
    }
}

impl DataClient {
    /// A client of the public API (the gateway): no credentials of its own.
    pub fn new() -> DataClient {
        Self::with_headers(reqwest::header::HeaderMap::new())
    }

    /// A client of the parts behind the gateway, as another Nimbus component: every
    /// request carries the cluster secret and route epoch 0 (no epoch set yet).
    pub fn internal(secret: &nimbus_net::ClusterSecret) -> DataClient {
        let mut headers = secret.default_headers();
        headers.insert(nimbus_api::data::ROUTE_EPOCH_HEADER, reqwest::header::HeaderValue::from_static("0"));
        Self::with_headers(headers)
    }

    fn with_headers(headers: reqwest::header::HeaderMap) -> DataClient {
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .pool_idle_timeout(crate::POOL_IDLE_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        DataClient { http }
    }

    /// Sends a request; `(0, error text)` when no HTTP answer came back.
    pub async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = self.http.request(method, url);
        if let Some(b) = body {
            req = req.json(b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp.text().await.unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
            }
            Err(e) => (0, Value::String(e.to_string())),
        }
    }

    pub async fn get(&self, url: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, url, None, &[]).await
    }

    pub async fn post(&self, url: &str, body: &Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, url, Some(body), &[]).await
    }
}
