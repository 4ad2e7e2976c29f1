//! Image input tokens by OpenAI's documented tile rule, and image sizes read from the
//! headers of data URLs.
//!
//! The rule (OpenAI's vision guide, GPT-4o family): `detail: "low"` costs a fixed base
//! (85 tokens). `high` first scales the image to fit within 2048 × 2048, then so that
//! its shortest side is 768 px (only ever down), and costs the base plus a tile price
//! (170) per 512 px tile. `auto` is taken as `high`: the worst case. An image whose size
//! is unknown (an `http` URL, a file id, an unreadable data URL) is charged the most any
//! image can cost at its detail: 8 tiles (a 2048 × 768 image), 1445 tokens.

use base64::Engine as _;

/// Base and per-tile tokens of a model family's images.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageRates {
    /// Tokens of every image (all of a `low` one).
    pub base: u32,
    /// Tokens of each 512 px tile of a `high` one.
    pub tile: u32,
}

impl ImageRates {
    /// GPT-4o, GPT-4.1, GPT-4.5, o1, o3 and most others: 85 + 170 per tile.
    pub const STANDARD: ImageRates = ImageRates {
        base: 85,
        tile: 170,
    };
    /// GPT-4o mini bills images at 2833 + 5667 per tile (the same money as GPT-4o's
    /// rule at its lower token price).
    pub const GPT_4O_MINI: ImageRates = ImageRates {
        base: 2833,
        tile: 5667,
    };

    /// The rates of `model`'s family.
    #[must_use]
    pub fn for_model(model: &str) -> Self {
        if model.starts_with("gpt-4o-mini") {
            Self::GPT_4O_MINI
        } else {
            Self::STANDARD
        }
    }
}

/// An image part's `detail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageDetail {
    /// A fixed 512 × 512 view: the base tokens only.
    Low,
    /// Tiled: base + tile tokens per 512 px tile.
    High,
    /// The provider chooses; estimated as `High`.
    Auto,
}

/// The most tiles any image has at high detail: a 2048 × 768 image is 4 × 2.
pub const MAX_TILES: u32 = 8;

/// Tokens of one image of `size` (width, height in pixels; `None` when unknown) at
/// `detail`, by OpenAI's tile rule.
///
/// ```
/// use tollgate::openai::{image_tokens, ImageDetail, ImageRates};
/// let r = ImageRates::STANDARD;
/// assert_eq!(image_tokens(Some((1024, 1024)), ImageDetail::High, r), 765);
/// assert_eq!(image_tokens(Some((2048, 4096)), ImageDetail::High, r), 1105);
/// assert_eq!(image_tokens(Some((4096, 8192)), ImageDetail::Low, r), 85);
/// assert_eq!(image_tokens(None, ImageDetail::Auto, r), 1445);
/// ```
#[must_use]
pub fn image_tokens(size: Option<(u32, u32)>, detail: ImageDetail, rates: ImageRates) -> u64 {
    let tiles = match (detail, size) {
        (ImageDetail::Low, _) => 0,
        (_, Some((width, height))) => tiles(u64::from(width), u64::from(height)),
        (_, None) => u64::from(MAX_TILES),
    };
    u64::from(rates.base) + tiles * u64::from(rates.tile)
}

/// 512 px tiles of a `width` × `height` image after OpenAI's two scalings. Scaled sides
/// are rounded up: a tile too many rather than one too few.
fn tiles(width: u64, height: u64) -> u64 {
    if width == 0 || height == 0 {
        return 0;
    }
    let (mut w, mut h) = (width, height);
    // Fit within 2048 × 2048.
    let longest = w.max(h);
    if longest > 2048 {
        w = (w * 2048).div_ceil(longest);
        h = (h * 2048).div_ceil(longest);
    }
    // Shortest side down to 768.
    let shortest = w.min(h);
    if shortest > 768 {
        w = (w * 768).div_ceil(shortest);
        h = (h * 768).div_ceil(shortest);
    }
    w.div_ceil(512) * h.div_ceil(512)
}

/// How much of a data URL's base64 is decoded to find the image's size: enough for
/// PNG, GIF and WebP headers, and for JPEG frame headers behind up to ~48 KiB of
/// metadata. Beyond it the size is unknown (worst case).
const HEADER_BASE64: usize = 64 * 1024;

/// Width and height of the image in a `data:image/...;base64,` URL, read from its
/// header; `None` for any other URL or an unreadable image.
#[must_use]
pub fn data_url_size(url: &str) -> Option<(u32, u32)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    if !meta.ends_with(";base64") {
        return None;
    }
    // Whole 4-character groups only, so a prefix decodes on its own.
    let take = data.len().min(HEADER_BASE64) / 4 * 4;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&data.as_bytes()[..take])
        .ok()?;
    let size = imagesize::blob_size(&bytes).ok()?;
    Some((
        u32::try_from(size.width).ok()?,
        u32::try_from(size.height).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_documented_examples() {
        let r = ImageRates::STANDARD;
        // 1024 × 1024 high: 768 × 768, 4 tiles.
        assert_eq!(image_tokens(Some((1024, 1024)), ImageDetail::High, r), 765);
        // 2048 × 4096 high: 1024 × 2048, then 768 × 1536, 6 tiles.
        assert_eq!(image_tokens(Some((2048, 4096)), ImageDetail::High, r), 1105);
        // 4096 × 8192 low: 85 whatever its size.
        assert_eq!(image_tokens(Some((4096, 8192)), ImageDetail::Low, r), 85);
    }

    #[test]
    fn the_unknown_size_is_the_largest_any_image_costs() {
        let r = ImageRates::STANDARD;
        let worst = image_tokens(None, ImageDetail::High, r);
        assert_eq!(worst, 1445);
        for w in (1..=6000).step_by(97) {
            for h in (1..=6000).step_by(89) {
                assert!(image_tokens(Some((w, h)), ImageDetail::High, r) <= worst);
            }
        }
        assert_eq!(image_tokens(Some((2048, 768)), ImageDetail::High, r), worst);
        assert_eq!(
            image_tokens(Some((u32::MAX, 1)), ImageDetail::High, r),
            85 + 4 * 170
        );
    }
}
