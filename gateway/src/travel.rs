//! Travel search: flights and hotels behind [`FlightSearch`] and [`HotelSearch`],
//! with an HTTP implementation, [`HttpTravel`], that speaks the Amadeus
//! Self-Service wire format (`GET {base}/v2/shopping/flight-offers`,
//! `GET {base}/v3/shopping/hotel-offers`, answers `{"data": [...]}` with prices
//! as decimal strings), which several aggregators and sandboxes mirror.
//!
//! Nothing is invented: a provider that is not configured or does not answer
//! is a 503 — unless the operator turned the fallback on
//! (`MATHIA_TRAVEL_FALLBACK=true`), and then the answer is a clearly labelled
//! sample (`source: "fallback"`, no prices).

use std::sync::Arc;
use std::time::Duration;

use chrono::{NaiveDate, NaiveDateTime};
use commands::money::Currency;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// A price in integer minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Price {
    /// Minor units.
    #[schema(example = 85000)]
    pub amount: i64,
    /// ISO 4217 code.
    #[schema(example = "GBP")]
    pub currency: String,
}

/// What a flight search asks.
#[derive(Debug, Clone, Serialize)]
pub struct FlightQuery {
    /// IATA code of the origin.
    pub origin: String,
    /// IATA code of the destination.
    pub destination: String,
    /// Departure date (local).
    pub date: NaiveDate,
    /// Adults.
    pub adults: u8,
}

/// One leg of a flight offer. Times are local at each airport, as providers give them.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FlightSegment {
    /// Airline code.
    #[schema(example = "KQ")]
    pub carrier: Option<String>,
    /// Flight number.
    #[schema(example = "100")]
    pub number: Option<String>,
    /// Departure airport.
    #[schema(example = "NBO")]
    pub from: String,
    /// Arrival airport.
    #[schema(example = "LHR")]
    pub to: String,
    /// Local departure time.
    #[schema(value_type = String, example = "2026-12-20T23:30:00")]
    pub departure_local: NaiveDateTime,
    /// Local arrival time.
    #[schema(value_type = Option<String>, example = "2026-12-21T06:10:00")]
    pub arrival_local: Option<NaiveDateTime>,
}

/// A flight offer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FlightOffer {
    /// The provider's offer id.
    pub id: String,
    /// Total price, if known.
    pub price: Option<Price>,
    /// Legs, in order.
    pub segments: Vec<FlightSegment>,
}

/// What a hotel search asks.
#[derive(Debug, Clone, Serialize)]
pub struct HotelQuery {
    /// IATA city code.
    pub city: String,
    /// Check-in date.
    pub check_in: NaiveDate,
    /// Check-out date.
    pub check_out: NaiveDate,
    /// Adults.
    pub adults: u8,
}

/// A hotel offer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct HotelOffer {
    /// The provider's hotel id.
    pub hotel_id: String,
    /// Name.
    pub name: String,
    /// The provider's offer id.
    pub offer_id: Option<String>,
    /// Check-in.
    #[schema(value_type = String, example = "2026-12-21")]
    pub check_in: NaiveDate,
    /// Check-out.
    #[schema(value_type = String, example = "2026-12-24")]
    pub check_out: NaiveDate,
    /// Total price, if known.
    pub price: Option<Price>,
}

/// Why a search has no answer.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// No provider is configured.
    #[error("no travel search provider is configured")]
    NotConfigured,
    /// The provider failed (after retries) or answered something unreadable.
    #[error("the travel provider failed: {0}")]
    Upstream(String),
}

/// Searches flights.
pub trait FlightSearch: Send + Sync + 'static {
    /// Offers for `q`.
    fn flights<'a>(
        &'a self,
        q: &'a FlightQuery,
    ) -> BoxFuture<'a, Result<Vec<FlightOffer>, SearchError>>;
}

/// Searches hotels.
pub trait HotelSearch: Send + Sync + 'static {
    /// Offers for `q`.
    fn hotels<'a>(
        &'a self,
        q: &'a HotelQuery,
    ) -> BoxFuture<'a, Result<Vec<HotelOffer>, SearchError>>;
}

/// The HTTP provider.
#[derive(Debug, Clone)]
pub struct HttpTravel {
    client: reqwest::Client,
    base: String,
    api_key: Option<String>,
    retries: u32,
}

/// Parse a decimal string (`"850.00"`) into minor units of `currency`, without floats.
pub fn minor_units(total: &str, currency: &str) -> Option<Price> {
    let c: Currency = currency.parse().ok()?;
    let scale = c.scale() as usize;
    let (whole, frac) = total.trim().split_once('.').unwrap_or((total.trim(), ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > scale && frac[scale..].bytes().any(|b| b != b'0')
    {
        return None;
    }
    let mut digits = frac.chars().take(scale).collect::<String>();
    while digits.len() < scale {
        digits.push('0');
    }
    let amount: i64 = format!("{whole}{digits}").parse().ok()?;
    (amount <= commands::money::MAX_AMOUNT).then(|| Price {
        amount,
        currency: c.code().to_owned(),
    })
}

#[derive(Deserialize)]
struct Data<T> {
    data: Vec<T>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AmadeusPrice {
    currency: String,
    total: Option<String>,
    /// Total with every fee: what the traveller pays, when given.
    grand_total: Option<String>,
}

impl AmadeusPrice {
    fn price(&self) -> Option<Price> {
        minor_units(
            self.grand_total.as_ref().or(self.total.as_ref())?,
            &self.currency,
        )
    }
}

#[derive(Deserialize)]
struct AmadeusFlightOffer {
    id: String,
    itineraries: Vec<AmadeusItinerary>,
    price: Option<AmadeusPrice>,
}

#[derive(Deserialize)]
struct AmadeusItinerary {
    segments: Vec<AmadeusSegment>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AmadeusSegment {
    departure: AmadeusPoint,
    arrival: AmadeusPoint,
    carrier_code: Option<String>,
    number: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AmadeusPoint {
    iata_code: String,
    at: NaiveDateTime,
}

#[derive(Deserialize)]
struct AmadeusHotelOffers {
    hotel: AmadeusHotel,
    #[serde(default)]
    offers: Vec<AmadeusHotelOffer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AmadeusHotel {
    hotel_id: String,
    name: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AmadeusHotelOffer {
    id: Option<String>,
    check_in_date: NaiveDate,
    check_out_date: NaiveDate,
    price: Option<AmadeusPrice>,
}

impl HttpTravel {
    /// A provider at `base` (no trailing path), with a per-request timeout and retries.
    pub fn new(
        base: &str,
        api_key: Option<String>,
        timeout: Duration,
        retries: u32,
    ) -> anyhow::Result<Self> {
        Ok(HttpTravel {
            client: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout)
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
            api_key,
            retries,
        })
    }

    /// GET `path?query`, retrying timeouts, connection failures, 429 and 5xx with backoff.
    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, SearchError> {
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << (attempt - 1).min(5))).await;
            }
            let url = reqwest::Url::parse_with_params(&format!("{}{path}", self.base), query)
                .map_err(|e| SearchError::Upstream(format!("bad provider URL: {e}")))?;
            let mut req = self.client.get(url);
            if let Some(k) = &self.api_key {
                req = req.bearer_auth(k);
            }
            match req.send().await {
                Ok(res) if res.status().is_success() => {
                    return res
                        .json::<T>()
                        .await
                        .map_err(|e| SearchError::Upstream(format!("unreadable answer: {e}")));
                }
                Ok(res)
                    if res.status().is_server_error()
                        || res.status() == reqwest::StatusCode::TOO_MANY_REQUESTS =>
                {
                    last = format!("HTTP {}", res.status());
                }
                Ok(res) => return Err(SearchError::Upstream(format!("HTTP {}", res.status()))),
                Err(e) => {
                    last = if e.is_timeout() {
                        "timed out".into()
                    } else {
                        "unreachable".into()
                    }
                }
            }
            tracing::debug!(attempt, error = %last, "travel provider call failed");
        }
        Err(SearchError::Upstream(format!(
            "{last} after {} attempts",
            self.retries + 1
        )))
    }
}

impl FlightSearch for HttpTravel {
    fn flights<'a>(
        &'a self,
        q: &'a FlightQuery,
    ) -> BoxFuture<'a, Result<Vec<FlightOffer>, SearchError>> {
        Box::pin(async move {
            let answer: Data<AmadeusFlightOffer> = self
                .get(
                    "/v2/shopping/flight-offers",
                    &[
                        ("originLocationCode", q.origin.clone()),
                        ("destinationLocationCode", q.destination.clone()),
                        ("departureDate", q.date.to_string()),
                        ("adults", q.adults.to_string()),
                        ("max", "20".into()),
                    ],
                )
                .await?;
            Ok(answer
                .data
                .into_iter()
                .map(|o| FlightOffer {
                    id: o.id,
                    price: o.price.as_ref().and_then(AmadeusPrice::price),
                    segments: o
                        .itineraries
                        .into_iter()
                        .flat_map(|i| i.segments)
                        .map(|s| FlightSegment {
                            carrier: s.carrier_code,
                            number: s.number,
                            from: s.departure.iata_code,
                            to: s.arrival.iata_code,
                            departure_local: s.departure.at,
                            arrival_local: Some(s.arrival.at),
                        })
                        .collect(),
                })
                .collect())
        })
    }
}

impl HotelSearch for HttpTravel {
    fn hotels<'a>(
        &'a self,
        q: &'a HotelQuery,
    ) -> BoxFuture<'a, Result<Vec<HotelOffer>, SearchError>> {
        Box::pin(async move {
            let answer: Data<AmadeusHotelOffers> = self
                .get(
                    "/v3/shopping/hotel-offers",
                    &[
                        ("cityCode", q.city.clone()),
                        ("checkInDate", q.check_in.to_string()),
                        ("checkOutDate", q.check_out.to_string()),
                        ("adults", q.adults.to_string()),
                    ],
                )
                .await?;
            Ok(answer
                .data
                .into_iter()
                .flat_map(|h| {
                    let (hotel_id, name) = (h.hotel.hotel_id, h.hotel.name);
                    h.offers.into_iter().map(move |o| HotelOffer {
                        hotel_id: hotel_id.clone(),
                        name: name.clone(),
                        offer_id: o.id,
                        check_in: o.check_in_date,
                        check_out: o.check_out_date,
                        price: o.price.as_ref().and_then(AmadeusPrice::price),
                    })
                })
                .collect())
        })
    }
}

/// No provider: every search says so.
#[derive(Debug, Clone, Copy)]
pub struct Unconfigured;

impl FlightSearch for Unconfigured {
    fn flights<'a>(
        &'a self,
        _: &'a FlightQuery,
    ) -> BoxFuture<'a, Result<Vec<FlightOffer>, SearchError>> {
        Box::pin(async { Err(SearchError::NotConfigured) })
    }
}

impl HotelSearch for Unconfigured {
    fn hotels<'a>(
        &'a self,
        _: &'a HotelQuery,
    ) -> BoxFuture<'a, Result<Vec<HotelOffer>, SearchError>> {
        Box::pin(async { Err(SearchError::NotConfigured) })
    }
}

/// The configured searches and the fallback flag.
#[derive(Clone)]
pub struct Travel {
    /// Flights.
    pub flights: Arc<dyn FlightSearch>,
    /// Hotels.
    pub hotels: Arc<dyn HotelSearch>,
    /// Answer a labelled sample when the provider cannot.
    pub fallback: bool,
}

impl Travel {
    /// From the gateway settings: an [`HttpTravel`] when a base URL is set.
    pub fn from_settings(s: &crate::Settings) -> anyhow::Result<Travel> {
        Ok(match &s.travel_url {
            Some(url) => {
                let http = Arc::new(HttpTravel::new(
                    url,
                    s.travel_api_key.clone(),
                    s.travel_timeout,
                    s.travel_retries,
                )?);
                Travel {
                    flights: http.clone(),
                    hotels: http,
                    fallback: s.travel_fallback,
                }
            }
            None => Travel {
                flights: Arc::new(Unconfigured),
                hotels: Arc::new(Unconfigured),
                fallback: s.travel_fallback,
            },
        })
    }
}

/// The labelled sample for a flight search: the route asked for, no schedule promise, no price.
pub fn fallback_flights(q: &FlightQuery) -> Vec<FlightOffer> {
    vec![FlightOffer {
        id: "fallback-1".into(),
        price: None,
        segments: vec![FlightSegment {
            carrier: None,
            number: None,
            from: q.origin.clone(),
            to: q.destination.clone(),
            departure_local: q.date.and_time(chrono::NaiveTime::MIN),
            arrival_local: None,
        }],
    }]
}

/// The labelled sample for a hotel search.
pub fn fallback_hotels(q: &HotelQuery) -> Vec<HotelOffer> {
    vec![HotelOffer {
        hotel_id: "fallback".into(),
        name: format!("Any hotel in {}", q.city),
        offer_id: None,
        check_in: q.check_in,
        check_out: q.check_out,
        price: None,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_prices_become_minor_units_without_floats() {
        assert_eq!(minor_units("850.00", "GBP").unwrap().amount, 85_000);
        assert_eq!(minor_units("850.5", "EUR").unwrap().amount, 85_050);
        assert_eq!(minor_units("12000", "JPY").unwrap().amount, 12_000);
        assert_eq!(minor_units("1.230", "USD").unwrap().amount, 123);
        assert!(minor_units("1.234", "USD").is_none());
        assert!(minor_units("-1.00", "USD").is_none());
        assert!(minor_units("1e3", "USD").is_none());
        assert!(minor_units("10.00", "XXX").is_none());
    }
}
