//! The notification stream (`GET /notifications/events`, contract §4.2) as
//! a stream of notification objects, reconnecting with `Last-Event-ID`.

use super::Client;
use futures::StreamExt;
use serde_json::Value;
use std::time::Duration;
use tokio::sync::mpsc;

/// Reads the stream of the jobs `ids` into `tx` until the receiver is
/// dropped; reconnects (from the last id seen) whenever the stream ends.
pub(super) async fn follow(client: &Client, ids: &[String], tx: mpsc::Sender<Value>) {
    let mut last_id: Option<String> = None;
    let query = format!(
        "/notifications/events?name_list=batch_edit,image_result&id_task={}",
        super::encode(&ids.join(","))
    );
    loop {
        let mut rb = client
            .http
            .get(client.url(&query))
            .bearer_auth(&client.key)
            .header("Accept", "text/event-stream");
        if let Some(id) = &last_id {
            rb = rb.header("Last-Event-ID", id);
        }
        if let Ok(answer) = rb.send().await
            && answer.status().is_success()
        {
            let mut body = answer.bytes_stream();
            let mut buffer = Vec::new();
            let mut event = Event::default();
            while let Some(Ok(chunk)) = body.next().await {
                buffer.extend_from_slice(&chunk);
                while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim_end_matches(['\n', '\r']);
                    if line.is_empty() {
                        let done = std::mem::take(&mut event);
                        if let Some(id) = done.id {
                            last_id = Some(id);
                        }
                        if let Ok(v) = serde_json::from_str::<Value>(&done.data)
                            && v.get("name").is_some()
                            && tx.send(v).await.is_err()
                        {
                            return;
                        }
                    } else {
                        event.line(line);
                    }
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        // The server may end a stream (after an hour, on shutdown); the
        // caller polls meanwhile, so a short pause is enough.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One event being read: `id:` and the `data:` lines (joined by newlines).
#[derive(Default)]
struct Event {
    id: Option<String>,
    data: String,
}

impl Event {
    fn line(&mut self, line: &str) {
        if line.starts_with(':') {
            return; // comment (keep-alive)
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.id = Some(value.to_string()),
            "data" => {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Event;

    #[test]
    fn reads_fields_and_skips_comments() {
        let mut e = Event::default();
        for l in [
            ":keepalive",
            "id: 7",
            "data: {\"a\":",
            "data: 1}",
            "event: backfill",
        ] {
            e.line(l);
        }
        assert_eq!(e.id.as_deref(), Some("7"));
        assert_eq!(e.data, "{\"a\":\n1}");
        let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
        assert_eq!(v["a"], 1);
    }
}
