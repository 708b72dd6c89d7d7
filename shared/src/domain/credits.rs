//! Credit arithmetic. Credits are stored and computed as integer
//! milli-credits (no floating point money); the HTTP edge renders them as
//! JSON numbers, which the contract allows to be fractional.

use serde::{Deserialize, Serialize};
use std::ops::{Add, AddAssign, Sub};

/// An amount of credits, in milli-credits.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Credits(pub i64);

impl Credits {
    pub const ZERO: Credits = Credits(0);

    pub const fn whole(n: i64) -> Self {
        Credits(n * 1000)
    }

    pub fn millis(self) -> i64 {
        self.0
    }

    /// The value the API shows (`13.0`, `2.5`).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / 1000.0
    }

    /// Parses an API amount; `None` for NaN, infinities, more than three
    /// decimals of precision lost, or out of range.
    pub fn from_f64(v: f64) -> Option<Self> {
        if !v.is_finite() || v.abs() > 1e12 {
            return None;
        }
        let m = (v * 1000.0).round();
        Some(Credits(m as i64))
    }

    pub fn checked_add(self, o: Credits) -> Option<Credits> {
        self.0.checked_add(o.0).map(Credits)
    }

    pub fn checked_sub(self, o: Credits) -> Option<Credits> {
        self.0.checked_sub(o.0).map(Credits)
    }
}

impl Add for Credits {
    type Output = Credits;
    fn add(self, o: Credits) -> Credits {
        Credits(self.0.saturating_add(o.0))
    }
}

impl AddAssign for Credits {
    fn add_assign(&mut self, o: Credits) {
        *self = *self + o;
    }
}

impl Sub for Credits {
    type Output = Credits;
    fn sub(self, o: Credits) -> Credits {
        Credits(self.0.saturating_sub(o.0))
    }
}

impl std::iter::Sum for Credits {
    fn sum<I: Iterator<Item = Credits>>(iter: I) -> Credits {
        iter.fold(Credits::ZERO, |a, b| a + b)
    }
}

/// The balance of one billing owner. `balance` is what the owner has;
/// `reserved` is held by jobs that are not terminal. The store keeps
/// `0 <= reserved <= balance` with a CHECK constraint, so credits can never
/// go negative: every charge is taken out of a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Balance {
    pub balance: Credits,
    pub reserved: Credits,
}

/// Why a balance movement was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("insufficient credits")]
    Insufficient,
    #[error("settlement exceeds the reservation")]
    OverSettle,
}

impl Balance {
    pub fn available(self) -> Credits {
        self.balance - self.reserved
    }

    /// Holds `amount` for a new job (contract §10.2 step 2–3).
    pub fn reserve(self, amount: Credits) -> Result<Balance, CreditError> {
        if amount.0 < 0 || self.available() < amount {
            return Err(CreditError::Insufficient);
        }
        Ok(Balance {
            balance: self.balance,
            reserved: self.reserved + amount,
        })
    }

    /// Moves `amount` from reserved to debited (an output completed).
    pub fn charge(self, amount: Credits) -> Result<Balance, CreditError> {
        if amount.0 < 0 || amount > self.reserved {
            return Err(CreditError::OverSettle);
        }
        Ok(Balance {
            balance: self.balance - amount,
            reserved: self.reserved - amount,
        })
    }

    /// Returns `amount` of the reservation without charge (failed/aborted).
    pub fn release(self, amount: Credits) -> Result<Balance, CreditError> {
        if amount.0 < 0 || amount > self.reserved {
            return Err(CreditError::OverSettle);
        }
        Ok(Balance {
            balance: self.balance,
            reserved: self.reserved - amount,
        })
    }

    /// Operator grant (negative for corrections); refused if it would leave
    /// less than what is already reserved.
    pub fn grant(self, amount: Credits) -> Result<Balance, CreditError> {
        let balance = self
            .balance
            .checked_add(amount)
            .ok_or(CreditError::Insufficient)?;
        if balance < self.reserved || balance.0 < 0 {
            return Err(CreditError::Insufficient);
        }
        Ok(Balance {
            balance,
            reserved: self.reserved,
        })
    }
}

/// Output size classes of the contract (§3.3, §3.4).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
pub enum SizeClass {
    #[serde(rename = "1K")]
    K1,
    #[serde(rename = "2K")]
    K2,
    #[serde(rename = "4K")]
    K4,
}

impl SizeClass {
    /// Long edge in pixels (contract §11 #24).
    pub fn long_edge(self) -> u32 {
        match self {
            SizeClass::K1 => 1024,
            SizeClass::K2 => 2048,
            SizeClass::K4 => 4096,
        }
    }

    /// The class a custom `width`×`height` is billed as (contract §3.4).
    pub fn for_custom(width: u32, height: u32) -> SizeClass {
        match width.max(height) {
            0..=1024 => SizeClass::K1,
            1025..=2048 => SizeClass::K2,
            _ => SizeClass::K4,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SizeClass::K1 => "1K",
            SizeClass::K2 => "2K",
            SizeClass::K4 => "4K",
        }
    }

    pub fn parse(s: &str) -> Option<SizeClass> {
        match s {
            "1K" => Some(SizeClass::K1),
            "2K" => Some(SizeClass::K2),
            "4K" => Some(SizeClass::K4),
            _ => None,
        }
    }
}

/// Per-output prices for generation jobs (contract §3.4). Operator-configurable;
/// the defaults are the contract's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PriceTable {
    #[serde(rename = "1K")]
    pub k1: f64,
    #[serde(rename = "2K")]
    pub k2: f64,
    #[serde(rename = "4K")]
    pub k4: f64,
    /// One model-swap output (per input image, flat).
    pub model_swap: f64,
    /// Preprocessing an uploaded identity photo.
    pub identity: f64,
    /// Building a profile from its photos.
    pub profile: f64,
    /// A Flux LoRA training, per hundred steps (contract §8.4).
    pub training_flux_per_100_steps: f64,
    /// An SD 1.5 / SDXL training, per hundred steps.
    pub training_sd_per_100_steps: f64,
    /// Drafting a preset from one image or from a text (contract §6.8, §6.9).
    pub extraction: f64,
}

impl Default for PriceTable {
    fn default() -> Self {
        PriceTable {
            k1: 3.0,
            k2: 5.0,
            k4: 10.0,
            model_swap: 3.0,
            identity: 50.0,
            profile: 50.0,
            training_flux_per_100_steps: 2.0,
            training_sd_per_100_steps: 1.0,
            extraction: 1.0,
        }
    }
}

impl PriceTable {
    /// A flat price of this table (`model_swap`, `identity`, `profile`).
    pub fn flat(v: f64) -> Credits {
        Credits::from_f64(v).unwrap_or(Credits::ZERO)
    }

    pub fn price(&self, size: SizeClass) -> Credits {
        let v = match size {
            SizeClass::K1 => self.k1,
            SizeClass::K2 => self.k2,
            SizeClass::K4 => self.k4,
        };
        Credits::from_f64(v).unwrap_or(Credits::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn contract_example_costs_13() {
        let t = PriceTable::default();
        let total: Credits = [
            t.price(SizeClass::K2),
            t.price(SizeClass::K2),
            t.price(SizeClass::K1),
        ]
        .into_iter()
        .sum();
        assert_eq!(total.as_f64(), 13.0);
        assert_eq!(SizeClass::for_custom(1024, 512), SizeClass::K1);
        assert_eq!(SizeClass::for_custom(1032, 512), SizeClass::K2);
        assert_eq!(SizeClass::for_custom(2056, 512), SizeClass::K4);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Reserve(i64),
        Charge(i64),
        Release(i64),
        Grant(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0i64..20_000).prop_map(Op::Reserve),
            (0i64..20_000).prop_map(Op::Charge),
            (0i64..20_000).prop_map(Op::Release),
            (-20_000i64..20_000).prop_map(Op::Grant),
        ]
    }

    proptest! {
        /// Whatever sequence of movements is attempted, the accepted ones
        /// never make the balance, the reservation or the available amount
        /// negative, and the balance only drops by what was charged.
        #[test]
        fn credits_never_go_negative(start in 0i64..50_000, ops in prop::collection::vec(op(), 0..60)) {
            let mut b = Balance { balance: Credits(start), reserved: Credits::ZERO };
            let mut granted = 0i64;
            let mut charged = 0i64;
            for o in ops {
                let next = match o {
                    Op::Reserve(a) => b.reserve(Credits(a)),
                    Op::Charge(a) => b.charge(Credits(a)).inspect(|_| charged += a),
                    Op::Release(a) => b.release(Credits(a)),
                    Op::Grant(a) => b.grant(Credits(a)).inspect(|_| granted += a),
                };
                if let Ok(n) = next { b = n; }
                prop_assert!(b.balance.0 >= 0);
                prop_assert!(b.reserved.0 >= 0);
                prop_assert!(b.available().0 >= 0);
                prop_assert_eq!(b.balance.0, start + granted - charged);
            }
        }

        /// Reserving the sum of per-output prices and then settling every
        /// output (charge or release) leaves nothing reserved and charges
        /// exactly the completed outputs.
        #[test]
        fn settling_every_output_frees_the_reservation(
            sizes in prop::collection::vec((0usize..3, any::<bool>()), 1..40),
        ) {
            let t = PriceTable::default();
            let classes = [SizeClass::K1, SizeClass::K2, SizeClass::K4];
            let costs: Vec<(Credits, bool)> = sizes.iter().map(|(i, ok)| (t.price(classes[*i]), *ok)).collect();
            let total: Credits = costs.iter().map(|c| c.0).sum();
            let mut b = Balance { balance: total + Credits::whole(1), reserved: Credits::ZERO };
            b = b.reserve(total).expect("enough");
            let mut expect_charged = Credits::ZERO;
            for (c, ok) in &costs {
                b = if *ok { expect_charged += *c; b.charge(*c) } else { b.release(*c) }.expect("within reservation");
            }
            prop_assert_eq!(b.reserved, Credits::ZERO);
            prop_assert_eq!(b.balance, Credits::whole(1) + total - expect_charged);
        }
    }
}
