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
    pub fn new() -> DataClient {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
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
