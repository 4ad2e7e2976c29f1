//! Money: `Decimal` at the API boundary, whole pico-dollars (10⁻¹² USD) inside.
//!
//! Pico-dollars make every cost exact: a price per million tokens with at most six
//! decimals is a whole number of pico-dollars per token, so `tokens × price` needs no
//! rounding anywhere and the counters equal the sum of receipts to the last digit.
//! An `i64` of pico-dollars holds ±9,223,372.036854775807 USD, which bounds every
//! budget, wallet and per-period counter (larger values are refused on load).

use rust_decimal::Decimal;

/// Pico-dollars per dollar.
pub(crate) const PICOS_PER_DOLLAR: i64 = 1_000_000_000_000;
/// Decimal places a money amount may carry.
pub(crate) const MONEY_SCALE: u32 = 12;
/// Decimal places a price per million tokens may carry (12 − 6).
pub(crate) const PRICE_SCALE: u32 = 6;
/// The highest price per million tokens accepted. It keeps the cost of any single
/// request (at most 2 × `u32::MAX` tokens) inside an `i64` of pico-dollars.
pub(crate) const MAX_PRICE_PER_MILLION: i64 = 1_000;

/// Why a decimal amount cannot be held exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MoneyProblem {
    Negative,
    TooPrecise { max_decimals: u32 },
    TooLarge { max: Decimal },
}

/// A dollar amount as whole pico-dollars, refusing anything not exactly representable.
pub(crate) fn picos_from_decimal(amount: Decimal) -> Result<i64, MoneyProblem> {
    if amount.is_sign_negative() && !amount.is_zero() {
        return Err(MoneyProblem::Negative);
    }
    let normalized = amount.normalize();
    if normalized.scale() > MONEY_SCALE {
        return Err(MoneyProblem::TooPrecise {
            max_decimals: MONEY_SCALE,
        });
    }
    let max = picos_to_decimal(i64::MAX);
    normalized
        .checked_mul(Decimal::from(PICOS_PER_DOLLAR))
        .and_then(|scaled| i64::try_from(scaled).ok())
        .ok_or(MoneyProblem::TooLarge { max })
}

/// A price per million tokens as whole pico-dollars per token.
pub(crate) fn price_per_token_picos(per_million: Decimal) -> Result<u64, MoneyProblem> {
    if per_million.is_sign_negative() && !per_million.is_zero() {
        return Err(MoneyProblem::Negative);
    }
    let normalized = per_million.normalize();
    if normalized.scale() > PRICE_SCALE {
        return Err(MoneyProblem::TooPrecise {
            max_decimals: PRICE_SCALE,
        });
    }
    let max = Decimal::from(MAX_PRICE_PER_MILLION);
    if normalized > max {
        return Err(MoneyProblem::TooLarge { max });
    }
    // Within the cap and scale, this product is an integer below 10^15.
    normalized
        .checked_mul(Decimal::from(1_000_000))
        .and_then(|scaled| u64::try_from(scaled).ok())
        .ok_or(MoneyProblem::TooLarge { max })
}

/// Pico-dollars as a `Decimal` amount of dollars, exactly.
pub(crate) fn picos_to_decimal(picos: i64) -> Decimal {
    Decimal::from_i128_with_scale(i128::from(picos), MONEY_SCALE).normalize()
}

/// The cost of a token count at a per-token price; exact, and in range by the price cap.
pub(crate) fn token_cost(tokens: u64, price_per_token: u64) -> i64 {
    let cost = u128::from(tokens) * u128::from(price_per_token);
    i64::try_from(cost).unwrap_or(i64::MAX)
}

/// The cost of `input` and `output` tokens at per-token prices, in pico-dollars:
/// what a reservation holds for its worst case and what a commit charges.
#[inline]
pub(crate) fn usage_cost(input: u64, output: u64, input_price: u64, output_price: u64) -> i64 {
    token_cost(input, input_price).saturating_add(token_cost(output, output_price))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn price_of_0_075_per_million_is_exact() {
        let per_token = price_per_token_picos(dec("0.075")).unwrap();
        assert_eq!(per_token, 75_000);
        // 13 tokens at $0.075/M is exactly $0.000000975.
        assert_eq!(
            picos_to_decimal(token_cost(13, per_token)),
            dec("0.075") * dec("13") / dec("1000000")
        );
    }

    #[test]
    fn too_precise_prices_and_amounts_are_refused_not_rounded() {
        assert_eq!(
            price_per_token_picos(dec("0.0000001")),
            Err(MoneyProblem::TooPrecise { max_decimals: 6 })
        );
        assert_eq!(
            picos_from_decimal(dec("0.0000000000001")),
            Err(MoneyProblem::TooPrecise { max_decimals: 12 })
        );
        // Trailing zeros are not precision.
        assert_eq!(
            picos_from_decimal(dec("1.500000000000000")),
            Ok(1_500_000_000_000)
        );
    }

    #[test]
    fn overflowing_amounts_are_refused() {
        assert!(matches!(
            picos_from_decimal(dec("9223372.036854775808")),
            Err(MoneyProblem::TooLarge { .. })
        ));
        assert_eq!(
            picos_from_decimal(dec("9223372.036854775807")),
            Ok(i64::MAX)
        );
        assert!(matches!(
            price_per_token_picos(dec("79228162514264337593543950335")),
            Err(MoneyProblem::TooLarge { .. })
        ));
        assert_eq!(picos_from_decimal(dec("-1")), Err(MoneyProblem::Negative));
    }

    #[test]
    fn largest_request_cost_fits() {
        let max_price = price_per_token_picos(Decimal::from(MAX_PRICE_PER_MILLION)).unwrap();
        let tokens = 2 * u64::from(u32::MAX);
        assert!(u128::from(tokens) * u128::from(max_price) <= i64::MAX as u128);
    }
}
