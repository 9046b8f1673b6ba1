//! Per-key single flight: concurrent callers with the same key run the work once; callers that
//! were waiting while it succeeded get its result. A failed or cancelled run leaves the next
//! waiter to try again itself (so one caller's cancellation never fails the others).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

type Slot<V> = Arc<tokio::sync::Mutex<Option<V>>>;

pub(crate) struct Flights<V> {
    slots: Mutex<HashMap<String, Slot<V>>>,
}

impl<V: Clone> Flights<V> {
    pub fn new() -> Self {
        Flights {
            slots: Mutex::new(HashMap::new()),
        }
    }

    pub async fn run<E, F, Fut>(&self, key: &str, work: F) -> Result<V, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V, E>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.entry(key.to_string()).or_default().clone()
        };
        let cleanup = Cleanup {
            flights: self,
            key,
            slot,
        };
        let mut guard = cleanup.slot.lock().await;
        if let Some(v) = guard.as_ref() {
            return Ok(v.clone());
        }
        let v = work().await?;
        *guard = Some(v.clone());
        Ok(v)
    }
}

/// Drops the slot from the map once nobody else holds it; runs on completion and cancellation.
struct Cleanup<'a, V> {
    flights: &'a Flights<V>,
    key: &'a str,
    slot: Slot<V>,
}

impl<V> Drop for Cleanup<'_, V> {
    fn drop(&mut self) {
        let mut slots = self.flights.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Holders: the map and us. Clones are only taken under this lock, so the count is exact.
        if Arc::strong_count(&self.slot) == 2 {
            slots.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_later_callers_run_again() {
        let f = Arc::new(Flights::<u32>::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (f, runs) = (f.clone(), runs.clone());
            tasks.push(tokio::spawn(async move {
                f.run("k", || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    Ok::<_, ()>(7)
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok(7));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert!(f.slots.lock().unwrap().is_empty());
        f.run("k", || async { Ok::<_, ()>(8) }).await.unwrap();
        assert_eq!(f.run("k", || async { Ok::<_, ()>(9) }).await, Ok(9));
    }

    #[tokio::test]
    async fn failure_lets_the_next_waiter_retry() {
        let f = Flights::<u32>::new();
        assert_eq!(
            f.run("k", || async { Err::<u32, _>("boom") }).await,
            Err("boom")
        );
        assert_eq!(f.run("k", || async { Ok::<_, &str>(1) }).await, Ok(1));
    }
}
