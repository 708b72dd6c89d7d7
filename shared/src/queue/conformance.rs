//! The queue conformance suite. Each check takes queue factories, so the
//! same assertions run against every implementation: embedded on SQLite and
//! Postgres, and RabbitMQ on the broker at `ATELIER_TEST_AMQP_URL`.

use super::{DynQueue, MAX_DELIVERIES, Message, Queue};
use crate::db::Dialect;
use crate::db::testing::TestDb;
use crate::queue::embedded::EmbeddedQueue;
use crate::queue::rabbitmq::RabbitQueue;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn qname(t: &str) -> String {
    format!("t_{t}_{}", ulid::Ulid::new().to_string().to_lowercase())
}

async fn recv(c: &mut super::Consumer, within: Duration) -> Option<super::Delivery> {
    tokio::time::timeout(within, c.next()).await.ok().flatten()
}

pub async fn publish_consume_ack(q: DynQueue) {
    let name = qname("pca");
    q.publish(
        &name,
        Message::json(&serde_json::json!({"n": 1}))
            .expect("json")
            .with_header("traceparent", "00-ab-cd-01"),
    )
    .await
    .expect("publish");
    let mut c = q.consume(&name, 4).await.expect("consume");
    let d = recv(&mut c, Duration::from_secs(5))
        .await
        .expect("delivered");
    assert_eq!(d.payload, r#"{"n":1}"#);
    assert_eq!(
        d.headers.get("traceparent").map(String::as_str),
        Some("00-ab-cd-01")
    );
    assert_eq!(d.deliveries, 1);
    d.ack().await.expect("ack");
    assert!(
        recv(&mut c, Duration::from_millis(600)).await.is_none(),
        "acked message must not come back"
    );
    assert_eq!(q.depth(&name).await.expect("depth"), 0);
}

pub async fn nack_redelivers(q: DynQueue) {
    let name = qname("nack");
    q.publish(&name, Message::json(&1).expect("json"))
        .await
        .expect("publish");
    let mut c = q.consume(&name, 1).await.expect("consume");
    let d = recv(&mut c, Duration::from_secs(5)).await.expect("first");
    d.nack(None).await.expect("nack");
    let d = recv(&mut c, Duration::from_secs(5))
        .await
        .expect("redelivered");
    assert_eq!(d.deliveries, 2);
    d.ack().await.expect("ack");
}

pub async fn prefetch_is_bounded(q: DynQueue) {
    let name = qname("prefetch");
    for i in 0..5 {
        q.publish(&name, Message::json(&i).expect("json"))
            .await
            .expect("publish");
    }
    let mut c = q.consume(&name, 2).await.expect("consume");
    let a = recv(&mut c, Duration::from_secs(5)).await.expect("a");
    let b = recv(&mut c, Duration::from_secs(5)).await.expect("b");
    assert!(
        recv(&mut c, Duration::from_millis(800)).await.is_none(),
        "a third unacked delivery exceeds prefetch 2"
    );
    a.ack().await.expect("ack");
    let c3 = recv(&mut c, Duration::from_secs(5))
        .await
        .expect("third after an ack");
    b.ack().await.expect("ack");
    c3.ack().await.expect("ack");
}

pub async fn delayed_publish_waits(q: DynQueue) {
    let name = qname("delay");
    let mut m = Message::json(&"later").expect("json");
    m.delay = Some(Duration::from_millis(1500));
    q.publish(&name, m).await.expect("publish");
    let mut c = q.consume(&name, 1).await.expect("consume");
    assert!(
        recv(&mut c, Duration::from_millis(700)).await.is_none(),
        "delivered before its delay"
    );
    let d = recv(&mut c, Duration::from_secs(5))
        .await
        .expect("delivered after the delay");
    d.ack().await.expect("ack");
}

pub async fn poison_messages_are_dead_lettered(q: DynQueue) {
    let name = qname("poison");
    q.publish(&name, Message::json(&"poison").expect("json"))
        .await
        .expect("publish");
    let mut c = q.consume(&name, 1).await.expect("consume");
    for _ in 0..MAX_DELIVERIES {
        let d = recv(&mut c, Duration::from_secs(5))
            .await
            .expect("delivered");
        d.nack(None).await.expect("nack");
    }
    assert!(
        recv(&mut c, Duration::from_millis(800)).await.is_none(),
        "delivered past the limit"
    );
    let mut dead = q
        .consume(&format!("{name}.dead"), 1)
        .await
        .expect("consume dead");
    let d = recv(&mut dead, Duration::from_secs(5))
        .await
        .expect("dead-lettered");
    assert_eq!(d.payload, r#""poison""#);
    d.ack().await.expect("ack");
}

/// A consumer's process dies holding a delivery: another process gets it.
pub async fn held_messages_survive_a_dead_consumer(
    first: DynQueue,
    crash: CancellationToken,
    second: DynQueue,
) {
    let name = qname("crash");
    first
        .publish(&name, Message::json(&"work").expect("json"))
        .await
        .expect("publish");
    let mut c = first.consume(&name, 1).await.expect("consume");
    let d = recv(&mut c, Duration::from_secs(5))
        .await
        .expect("delivered");
    // The process dies: its tasks stop, nothing is settled.
    crash.cancel();
    std::mem::forget(d);
    let mut c2 = second.consume(&name, 1).await.expect("consume");
    let d = recv(&mut c2, Duration::from_secs(10))
        .await
        .expect("redelivered to the survivor");
    assert_eq!(d.deliveries, 2);
    d.ack().await.expect("ack");
}

/// A consumer dropped with a delivery fetched but unread: the message is
/// handed back at once, not after a lease (30 s here) or a channel timeout.
pub async fn a_dropped_consumer_hands_back_what_it_fetched(q: DynQueue) {
    let name = qname("drop");
    for n in 0..2 {
        q.publish(&name, Message::json(&n).expect("json"))
            .await
            .expect("publish");
    }
    let mut c = q.consume(&name, 2).await.expect("consume");
    let first = recv(&mut c, Duration::from_secs(5)).await.expect("first");
    first.ack().await.expect("ack");
    // Wait until the second is fetched (no longer ready in the queue).
    let t = std::time::Instant::now();
    while q.depth(&name).await.expect("depth") > 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "never fetched");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    let mut c2 = q.consume(&name, 1).await.expect("consume");
    let d = recv(&mut c2, Duration::from_secs(5))
        .await
        .expect("handed back at once");
    assert_eq!(d.parse::<i32>().expect("n"), 1);
    d.ack().await.expect("ack");
}

fn embedded(db: &TestDb, lease_ms: u64) -> (DynQueue, CancellationToken) {
    let stop = CancellationToken::new();
    let q = EmbeddedQueue::with_lease(
        db.store.clone(),
        stop.clone(),
        Duration::from_millis(lease_ms),
        Duration::from_millis(lease_ms / 3),
    );
    (Arc::new(q) as Arc<dyn Queue>, stop)
}

macro_rules! embedded_suite {
    ($m:ident, $dialect:expr) => {
        mod $m {
            use super::*;

            #[tokio::test]
            async fn publish_consume_ack() {
                let db = TestDb::new($dialect).await;
                super::publish_consume_ack(embedded(&db, 30_000).0).await;
            }

            #[tokio::test]
            async fn nack_redelivers() {
                let db = TestDb::new($dialect).await;
                super::nack_redelivers(embedded(&db, 30_000).0).await;
            }

            #[tokio::test]
            async fn prefetch_is_bounded() {
                let db = TestDb::new($dialect).await;
                super::prefetch_is_bounded(embedded(&db, 30_000).0).await;
            }

            #[tokio::test]
            async fn delayed_publish_waits() {
                let db = TestDb::new($dialect).await;
                super::delayed_publish_waits(embedded(&db, 30_000).0).await;
            }

            #[tokio::test]
            async fn poison_messages_are_dead_lettered() {
                let db = TestDb::new($dialect).await;
                super::poison_messages_are_dead_lettered(embedded(&db, 30_000).0).await;
            }

            #[tokio::test]
            async fn a_dropped_consumer_hands_back_what_it_fetched() {
                let db = TestDb::new($dialect).await;
                super::a_dropped_consumer_hands_back_what_it_fetched(embedded(&db, 30_000).0).await;
            }

            #[tokio::test]
            async fn held_messages_survive_a_dead_consumer() {
                let db = TestDb::new($dialect).await;
                let (first, crash) = embedded(&db, 1_200);
                let (second, _keep) = embedded(&db, 1_200);
                super::held_messages_survive_a_dead_consumer(first, crash, second).await;
            }
        }
    };
}

embedded_suite!(embedded_sqlite, Dialect::Sqlite);
embedded_suite!(embedded_postgres, Dialect::Postgres);

/// The broker `scripts/test` starts, unless `ATELIER_TEST_AMQP_URL` says otherwise.
const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A RabbitMQ queue on its own connection; cancelling the token closes that
/// connection, as a process dying would. Tests never delete queues: every
/// test uses fresh names ([`qname`]).
async fn rabbitmq_queue() -> (DynQueue, CancellationToken) {
    let url =
        std::env::var("ATELIER_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.to_string());
    let stop = CancellationToken::new();
    // Names are unique per test already; the namespace is exercised too.
    let q = RabbitQueue::connect(&url, "conformance.", stop.clone()).await.expect(
        "RabbitMQ must be reachable for tests (scripts/test starts it); set ATELIER_TEST_AMQP_URL",
    );
    (Arc::new(q) as Arc<dyn Queue>, stop)
}

mod rabbitmq {
    use super::*;

    #[tokio::test]
    async fn publish_consume_ack() {
        super::publish_consume_ack(rabbitmq_queue().await.0).await;
    }

    #[tokio::test]
    async fn nack_redelivers() {
        super::nack_redelivers(rabbitmq_queue().await.0).await;
    }

    #[tokio::test]
    async fn prefetch_is_bounded() {
        super::prefetch_is_bounded(rabbitmq_queue().await.0).await;
    }

    #[tokio::test]
    async fn delayed_publish_waits() {
        super::delayed_publish_waits(rabbitmq_queue().await.0).await;
    }

    #[tokio::test]
    async fn poison_messages_are_dead_lettered() {
        super::poison_messages_are_dead_lettered(rabbitmq_queue().await.0).await;
    }

    #[tokio::test]
    async fn a_dropped_consumer_hands_back_what_it_fetched() {
        super::a_dropped_consumer_hands_back_what_it_fetched(rabbitmq_queue().await.0).await;
    }

    /// No lease to wait out: cancelling the first queue's token closes its
    /// connection and the broker requeues what its channel held.
    #[tokio::test]
    async fn held_messages_survive_a_dead_consumer() {
        let (first, crash) = rabbitmq_queue().await;
        let (second, _keep) = rabbitmq_queue().await;
        super::held_messages_survive_a_dead_consumer(first, crash, second).await;
    }
}
