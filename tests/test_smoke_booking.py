from booking.v1 import appointment_pb2 as apb
from tests.support import Api, hours_from_now


async def test_a_client_can_hold_and_confirm_a_slot(api: Api) -> None:
    spec = await api.specialist()
    slot = await api.slot(spec.id, hours_from_now(24))
    client, client_id = await api.client()
    held = await client.hold(slot.id)
    assert held.status == apb.APPOINTMENT_STATUS_HOLD
    assert held.user_id == client_id
    confirmed = await client.appointments.ConfirmAppointment(
        apb.ConfirmAppointmentRequest(id=held.id), metadata=client.md
    )
    assert confirmed.appointment.status == apb.APPOINTMENT_STATUS_CONFIRMED
