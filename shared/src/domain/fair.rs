//! Weighted fair pick of the next outputs to dispatch.
//!
//! Every account with eligible outputs is a *lane*. A lane's virtual time is
//! `(used + in_flight + picked) / weight`, where `used` is the service the
//! account already had in slots (zero on the short-task queues; the slot
//! time of its recent trainings on the training queue, so that trainer time
//! is shared, not only trainer slots); each pick goes to the lane with the
//! smallest virtual time (ties: the oldest waiting output, then the account
//! id, so the result is deterministic). An account that floods the system
//! with a 1,000-output job therefore gets one slot for every slot of an
//! account with a single output, and a newcomer's first output is picked
//! within one round of the lanes.

use std::collections::VecDeque;

/// One eligible output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub output_id: i64,
    /// When it became eligible (epoch ms): older first within a lane.
    pub ready_at: i64,
}

#[derive(Debug, Clone)]
pub struct Lane {
    pub account: String,
    /// Relative share; enterprise accounts may be given more. Zero is treated as one.
    pub weight: u32,
    /// Outputs of this account already dispatched or running.
    pub in_flight: u32,
    /// Service already received, in thousandths of a slot (one task's
    /// worth of slot time is 1,000); 0 where only concurrency is shared.
    pub used_millis: u64,
    /// Eligible outputs, oldest first.
    pub waiting: VecDeque<Candidate>,
}

/// Picks up to `slots` outputs across `lanes`, in dispatch order.
pub fn pick(mut lanes: Vec<Lane>, slots: usize) -> Vec<(String, Candidate)> {
    let mut picked_per_lane = vec![0u64; lanes.len()];
    let mut out = Vec::with_capacity(slots);
    while out.len() < slots {
        let mut best: Option<usize> = None;
        for (i, lane) in lanes.iter().enumerate() {
            let Some(head) = lane.waiting.front() else {
                continue;
            };
            let better = match best {
                None => true,
                Some(b) => {
                    let lb = &lanes[b];
                    // Compare (in_flight + picked) / weight without floats:
                    // a/wa < b/wb  <=>  a*wb < b*wa.
                    let wa = u64::from(lane.weight.max(1));
                    let wb = u64::from(lb.weight.max(1));
                    let va = (lane.used_millis
                        + (u64::from(lane.in_flight) + picked_per_lane[i]) * 1000)
                        .saturating_mul(wb);
                    let vb = (lb.used_millis
                        + (u64::from(lb.in_flight) + picked_per_lane[b]) * 1000)
                        .saturating_mul(wa);
                    let hb = lb.waiting.front().map(|c| c.ready_at).unwrap_or(i64::MAX);
                    (va, head.ready_at, &lane.account) < (vb, hb, &lb.account)
                }
            };
            if better {
                best = Some(i);
            }
        }
        let Some(i) = best else { break };
        if let Some(c) = lanes[i].waiting.pop_front() {
            picked_per_lane[i] += 1;
            out.push((lanes[i].account.clone(), c));
        }
    }
    out
}

/// How many outputs per lane a dispatch round reads first, when the last
/// round saw `lanes` lanes: about twice a lane's fair share of `slots`, so
/// that the usual round reads tens of rows rather than lanes × `slots`;
/// `slots` (every lane's whole possible share) when there were none or
/// one. [`pick_within`] says when that was not enough.
pub fn first_read(slots: usize, lanes: usize) -> usize {
    if lanes <= 1 {
        return slots.max(1);
    }
    ((2 * slots).div_ceil(lanes) + 1).clamp(1, slots.max(1))
}

/// [`pick`] over lanes read with at most `limit` outputs each (their
/// oldest). The answer is what [`pick`] gives over the whole lanes, or
/// `None` when that cannot be told from what was read: a lane that may
/// hold more (it has `limit` outputs here) had all of them picked, so
/// [`pick`] would have weighed its next output too. Every other pick only
/// ever looked at heads that the whole lanes share.
pub fn pick_within(lanes: Vec<Lane>, slots: usize, limit: usize) -> Option<Vec<(String, Candidate)>> {
    let cut: Vec<(String, usize)> = if limit >= slots {
        // No lane can be given more than `slots`.
        Vec::new()
    } else {
        lanes
            .iter()
            .filter(|l| l.waiting.len() >= limit)
            .map(|l| (l.account.clone(), l.waiting.len()))
            .collect()
    };
    let picks = pick(lanes, slots);
    let exhausted = cut
        .iter()
        .any(|(account, read)| picks.iter().filter(|p| &p.0 == account).count() >= *read);
    (!exhausted).then_some(picks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{HashMap, HashSet};

    fn lane(account: &str, weight: u32, in_flight: u32, n: usize, t0: i64) -> Lane {
        Lane {
            account: account.into(),
            weight,
            in_flight,
            used_millis: 0,
            waiting: (0..n)
                .map(|i| Candidate {
                    output_id: t0 * 10_000 + i as i64,
                    ready_at: t0 + i as i64,
                })
                .collect(),
        }
    }

    #[test]
    fn a_single_output_is_not_starved_by_a_flood() {
        // The flooding account queued 1,000 outputs long before.
        let lanes = vec![lane("flood", 1, 4, 1000, 0), lane("small", 1, 0, 1, 5_000)];
        let picks = pick(lanes, 1);
        assert_eq!(picks[0].0, "small");
    }

    #[test]
    fn slot_time_already_used_counts_against_a_lane() {
        // Both idle; "busy" had two trainings' worth of slot time lately.
        let mut busy = lane("busy", 1, 0, 5, 0);
        busy.used_millis = 2000;
        let fresh = lane("fresh", 1, 0, 5, 1_000);
        let order: Vec<String> = pick(vec![busy, fresh], 4).into_iter().map(|p| p.0).collect();
        assert_eq!(order, ["fresh", "fresh", "busy", "fresh"]);
    }

    #[test]
    fn a_lane_read_short_that_wins_every_pick_asks_for_more() {
        // Nine busy accounts and one idle one: the idle one wins the first
        // five picks, more than the three of its outputs read first.
        let mut whole: Vec<Lane> = (0..9).map(|i| lane(&format!("busy{i}"), 1, 5, 10, i)).collect();
        whole.push(lane("idle", 1, 0, 10, 100));
        let limit = first_read(8, whole.len());
        assert_eq!(limit, 3);
        let read: Vec<Lane> = whole
            .iter()
            .cloned()
            .map(|mut l| {
                l.waiting.truncate(limit);
                l
            })
            .collect();
        assert_eq!(pick_within(read, 8, limit), None);
        assert_eq!(pick_within(whole.clone(), 8, 8), Some(pick(whole, 8)));
    }

    proptest! {
        #[test]
        fn picks_are_unique_bounded_and_fair(
            sizes in prop::collection::vec(0usize..30, 1..6),
            slots in 0usize..80,
        ) {
            let lanes: Vec<Lane> = sizes.iter().enumerate()
                .map(|(i, n)| lane(&format!("a{i}"), 1, 0, *n, i as i64))
                .collect();
            let total: usize = sizes.iter().sum();
            let picks = pick(lanes, slots);
            prop_assert_eq!(picks.len(), slots.min(total));
            let ids: HashSet<i64> = picks.iter().map(|p| p.1.output_id).collect();
            prop_assert_eq!(ids.len(), picks.len());
            // Equal weights, nothing in flight: any two accounts that still had
            // work left after the picks differ by at most one pick.
            let mut count: HashMap<&str, usize> = HashMap::new();
            for p in &picks { *count.entry(p.0.as_str()).or_default() += 1; }
            let unsaturated: Vec<usize> = sizes.iter().enumerate()
                .filter(|(i, n)| count.get(format!("a{i}").as_str()).copied().unwrap_or(0) < **n)
                .map(|(i, _)| count.get(format!("a{i}").as_str()).copied().unwrap_or(0))
                .collect();
            if let (Some(min), Some(max)) = (unsaturated.iter().min(), unsaturated.iter().max()) {
                prop_assert!(max - min <= 1);
            }
            // Within a lane, oldest first.
            for w in picks.windows(2) {
                if w[0].0 == w[1].0 { prop_assert!(w[0].1.ready_at < w[1].1.ready_at); }
            }
        }

        #[test]
        fn a_pick_within_prefixes_is_the_whole_pick_or_none(
            lanes_spec in prop::collection::vec((0usize..12, 0u32..6, 1u32..3), 1..8),
            slots in 1usize..24,
            lanes_seen in 0usize..10,
        ) {
            let whole: Vec<Lane> = lanes_spec.iter().enumerate()
                .map(|(i, (n, in_flight, w))| lane(&format!("a{i}"), *w, *in_flight, *n, i as i64 * 3))
                .collect();
            let limit = first_read(slots, lanes_seen);
            prop_assert!((1..=slots).contains(&limit));
            let read: Vec<Lane> = whole.iter().cloned()
                .map(|mut l| { l.waiting.truncate(limit); l })
                .collect();
            let expected = pick(whole, slots);
            match pick_within(read, slots, limit) {
                Some(p) => prop_assert_eq!(p, expected),
                // Only when some lane really was cut short.
                None => prop_assert!(lanes_spec.iter().any(|(n, _, _)| *n >= limit)),
            }
        }

        #[test]
        fn a_newcomer_waits_at_most_one_round(flooders in 1usize..5, in_flight in 0u32..10) {
            let mut lanes: Vec<Lane> = (0..flooders)
                .map(|i| lane(&format!("f{i}"), 1, in_flight, 500, i as i64))
                .collect();
            lanes.push(lane("new", 1, 0, 1, 100_000));
            let picks = pick(lanes, flooders + 1);
            prop_assert!(picks.iter().any(|p| p.0 == "new"));
        }

        #[test]
        fn weight_buys_proportional_share(w in 1u32..5) {
            let lanes = vec![lane("ent", w, 0, 1000, 0), lane("std", 1, 0, 1000, 1)];
            let picks = pick(lanes, 100 * (w as usize + 1));
            let ent = picks.iter().filter(|p| p.0 == "ent").count() as i64;
            let std = picks.iter().filter(|p| p.0 == "std").count() as i64;
            prop_assert!((ent - std * i64::from(w)).abs() <= i64::from(w));
        }
    }
}
